import sys

from publisher.vllm.demo.run import main

sys.exit(main())
