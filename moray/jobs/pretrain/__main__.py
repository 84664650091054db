import sys

from moray.jobs.pretrain.job import main

sys.exit(main())
