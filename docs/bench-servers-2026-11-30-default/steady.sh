#!/bin/bash
# steady state at 16 streams: the default config against the same with vllm_plain_from: 6
# run from the repository root; bench-out/he.jsonl holds the 164 HumanEval prompts, one
# {"prompt": ...} a line (deer_serve.bench.suites.load_suite("humaneval", 164))
mkdir -p bench-out/steady
sed 's/        vllm_plain_engine: true /        vllm_plain_engine: true\n        vllm_plain_from: 6        /' cluster/serve_config.yaml > bench-out/steady/pf6.yaml
grep -q "vllm_plain_from: 6" bench-out/steady/pf6.yaml || { echo "no pf6"; exit 1; }
for round in 1 2; do
  for v in default pf6; do
    cfg=cluster/serve_config.yaml; [ $v = pf6 ] && cfg=bench-out/steady/pf6.yaml
    (OMP_NUM_THREADS=1 setsid .venv/bin/deer-serve serve --config $cfg --no-dashboard --grpc-port 0 > bench-out/steady/$v-$round.server.log 2>&1 &)
    for i in $(seq 1 300); do curl -s -o /dev/null -w "%{http_code}" 127.0.0.1:8000/healthz 2>/dev/null | grep -q 200 && break; sleep 1; done
    .venv/bin/deer-serve load --url http://127.0.0.1:8000 -c 16 -t 5 --max-tokens 128 --prompts bench-out/he.jsonl > /dev/null 2>&1
    .venv/bin/deer-serve load --url http://127.0.0.1:8000 -c 16 -t 40 --max-tokens 128 --prompts bench-out/he.jsonl --out bench-out/steady/$v-$round.json > bench-out/steady/$v-$round.txt 2>&1
    echo "$v round $round: $(tail -3 bench-out/steady/$v-$round.txt | tr '\n' ' ')"
    pkill -INT -f "deer-serve serve"; for i in $(seq 1 60); do pgrep -f "deer-serve serve" > /dev/null || break; sleep 1; done
    pkill -9 -f "VLLM::" ; sleep 2
  done
done
