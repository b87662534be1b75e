"""Generation throughput with QServe's protocol on random weights of a real model shape: the same command as
`qserve-lite bench` (see qserve_lite/bench/throughput.py for the protocol and every flag).

    python examples/benchmark.py --model llama-3-8b --precision w4a8kv4 --group-size 128 --batch 256
    GLOBAL_BATCH_SIZE=64,128 NUM_GPU_PAGE_BLOCKS=3200 python examples/benchmark.py --model llama-2-7b
    python examples/benchmark.py --model llama-2-70b --max-batch
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qserve_lite.bench.throughput import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
