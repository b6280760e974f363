import sys

from forensic_vlm.cli import main

sys.exit(main())
