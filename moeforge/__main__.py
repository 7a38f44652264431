from moeforge.cli import main

raise SystemExit(main())
