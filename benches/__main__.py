from benches.run import main

raise SystemExit(main())
