from resdistill.cli import main

raise SystemExit(main())
