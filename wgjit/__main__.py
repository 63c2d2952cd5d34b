from wgjit.cli import main

raise SystemExit(main())
