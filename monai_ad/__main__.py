import sys

from monai_ad.cli import main

sys.exit(main())
