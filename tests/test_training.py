"""The DDP launch of pipelines.training: every rank of the node at once, and no rank left waiting."""
import subprocess
import sys
import time

from pipelines.training import Hardware, _launch_ranks, _wait


def test_ranks_start_with_their_own_local_rank_and_one_shared_address(tmp_path):
    script = ("import os; e = os.environ; open(os.path.join(%r, e['LOCAL_RANK']), 'w').write("
              "' '.join(e[k] for k in ('WORLD_SIZE', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')))" % str(tmp_path))
    ranks = _launch_ranks([sys.executable, "-c", script], {}, Hardware(devices=3, num_nodes=2))
    assert _wait(ranks) == [0, 0, 0]
    seen = {path.name: path.read_text().split() for path in tmp_path.iterdir()}
    assert set(seen) == {"0", "1", "2"}
    world_size, node_rank, address, port = seen["0"]
    assert (world_size, node_rank, address) == ("6", "0", "127.0.0.1") and int(port) > 0
    assert seen["1"] == seen["2"] == seen["0"]  # one rendezvous for every rank


def test_a_failing_rank_stops_the_others():
    ranks = [subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"]),
             subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    start = time.monotonic()
    codes = _wait(ranks)
    assert codes[0] == 3 and codes[1] != 0 and time.monotonic() - start < 30
