#!/usr/bin/env bash
# One visit to a single-GPU machine: kubetune's training step against transformers' packed path, the memory of
# the fused loss, and the host syncs of a step. Under 8 minutes in all, then one markdown table.
#
#     bash benchmarks/gpu_wheels.sh         # HERE, once: the wheels that machine lacks, into .whl/ (git-ignored)
#     bash benchmarks/gpu_check.sh          # THERE (carry .whl); writes $OUT/gpu_check.log when OUT is set
#     GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # a dry run of this script on CPU, tiny models
#     GPU_CHECK_RUNS="1b-lora 1b-lora-hf" bash benchmarks/gpu_check.sh   # only these runs (a rerun)
#
# Each configuration is its own `torchrun --nproc-per-node=1` process with its own timeout; a failure is noted
# and the next one runs. Every timeout is cut to what is left of DEADLINE_S (counted from the start, pip
# included), and `timeout -k` gives torchrun the 30 s it takes to stop its worker, so the whole stays under
# 8 minutes. The runs are in order of value: what the deadline cuts is at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

DEADLINE_S=${GPU_CHECK_DEADLINE_S:-420}
START=$SECONDS
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && LOG=$OUT/gpu_check.log; fi
PY=${GPU_CHECK_PY:-/opt/torch/.venv/bin/python}  # the Python that has torch there
[ -x "$PY" ] || PY=$PWD/.venv/bin/python
[ -x "$PY" ] || PY=python3

if [ -n "${GPU_CHECK_SMOKE:-}" ]; then  # tiny shapes on CPU: tests this script, measures nothing
    SMALL=(--preset tiny --seq 256 --global-batch 8 --warmup 1 --steps 2)
    BIG=(--preset small --seq 256 --global-batch 4 --warmup 1 --steps 1)
    LOSS=(tiny:256:2 small:256:2)
else
    SMALL=(--preset 1b --seq 2048 --global-batch 32 --warmup 2 --steps 5)
    # LoRA r 16, all linear layers (the job's), within what an 80 GB GPU has (an H100 80GB: 79.6 GiB)
    BIG=(--preset 8b --seq 4096 --global-batch 8 --warmup 2 --steps 3 --memory-gib 79)
    LOSS=(1b:2048:8 8b:4096:2)
fi

install_wheels() {
    # The packages that machine lacks (deepspeed, pydantic, ...), installed from the carried wheels into /tmp/site.
    if [ -n "${GPU_CHECK_SMOKE:-}" ]; then  # the wheels are for Python 3.12; the project's venv has it all
        export PYTHONPATH=$PWD/src
    elif ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
            "$PY" -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.whl/*.whl')]"
        export PYTHONPATH=/tmp/site:$PWD/src
    else
        echo "no .whl/ here (run benchmarks/gpu_wheels.sh first where there is a network); using what is installed"
        export PYTHONPATH=$PWD/src
    fi
}

bench() {
    # bench NAME LIMIT_S ARGS...: one torchrun process of bench_gpu.py, output kept in $WORK/NAME.out.
    local name=$1 limit=$2
    shift 2
    if [ -n "${GPU_CHECK_RUNS:-}" ] && [[ " $GPU_CHECK_RUNS " != *" $name "* ]]; then return; fi
    local left=$((DEADLINE_S - (SECONDS - START)))
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        echo "=== $name: skipped, ${left} s left of ${DEADLINE_S} s"
        echo "RUN {\"name\": \"$name\", \"rc\": null}" >"$WORK/$name.out"
        return
    fi
    echo "=== $name (timeout ${limit} s): bench_gpu.py $*"
    local began=$SECONDS
    timeout -k 40 "$limit" "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 benchmarks/bench_gpu.py "$@" \
        2>&1 | tee "$WORK/$name.out"
    local rc=${PIPESTATUS[0]}
    echo "RUN {\"name\": \"$name\", \"rc\": $rc}" >>"$WORK/$name.out"
    echo "=== $name: exit $rc after $((SECONDS - began)) s$([ "$rc" = 124 ] && echo ' (timed out)')"
}

product_flags() {
    # The micro batch (and gradient checkpointing) the product chose in run NAME, for its baseline.
    [ -f "$WORK/$1.out" ] || return 0  # not run (GPU_CHECK_RUNS)
    "$PY" - "$WORK/$1.out" <<'EOF'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("RESULT "):
        r = json.loads(line[7:])
        if r.get("kind") == "kubetune":
            print(f"--micro {r['micro']}" + (" --gradient-checkpointing" if r["gradient_checkpointing"] else ""))
EOF
}

table() {
    # One markdown table from the RESULT lines of every run, in run order.
    "$PY" - "$WORK" "$@" <<'EOF'
import json, sys
from pathlib import Path

work, names = Path(sys.argv[1]), sys.argv[2:]
runs = {}
for name in names:
    lines = (work / f"{name}.out").read_text(errors="replace").splitlines() if (work / f"{name}.out").exists() else []
    runs[name] = [json.loads(l[7:]) for l in lines if l.startswith("RESULT ")]
    runs[name + ":rc"] = next((json.loads(l[4:])["rc"] for l in lines if l.startswith("RUN ")), None)
speed = {(r["preset"], r["method"], r["seq"]): r["tokens_per_s"]
         for n in names for r in runs[n] if r["kind"] == "transformers"}

def num(x, fmt):
    return "n/a" if x is None else format(x, fmt)

print("\n| configuration | tokens/s | MFU | peak GiB | micro | ratio to baseline |")
print("|---|---:|---:|---:|---:|---:|")
notes = []
for name in names:
    if not runs[name]:
        rc = runs[name + ":rc"]
        why = "skipped (deadline)" if rc is None else "timed out" if rc in (124, 137) else f"failed (exit {rc})"
        print(f"| {name}: {why} | | | | | |")
    for r in runs[name]:
        if r["kind"] in ("kubetune", "transformers"):
            base = speed.get((r["preset"], r["method"], r["seq"]))
            ratio = "1.00" if r["kind"] == "transformers" else num(base and r["tokens_per_s"] / base, ".2f")
            extras = ", ".join(x for x in ("auto" if r.get("micro_auto") else "",
                                           "ckpt" if r["gradient_checkpointing"] else "",
                                           "compiled" if r["compile"] != "off" else "") if x)
            print(f"| {r['preset']} {r['method']} seq {r['seq']}, {r['kind']} | {r['tokens_per_s']:,.0f} | "
                  f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} | {num(r['peak_gib'], '.1f')} | "
                  f"{r['micro']}{f' ({extras})' if extras else ''} | {ratio} |")
        elif r["kind"] == "loss-memory":
            shape = f"{r['preset']} {r['micro']}x{r['length']}, vocab {r['vocab']}"
            print(f"| loss {shape}: logits + fp32 CE | | | {num(r['old']['extra_gib'], '.2f')} | {r['micro']} | 1.00 |")
            print(f"| loss {shape}: kubetune.packed.loss | | | {num(r['new']['extra_gib'], '.2f')} | {r['micro']} | "
                  f"{num(r['ratio'], '.2f')} |")
        elif r["kind"] == "sync-check":
            top = "; ".join(f"{s['count']}x {s['where']}" for s in r["sites"][:5])
            notes.append(f"host syncs ({r['preset']} {r['method']}): {r['syncs']} in {r['steps']} steps"
                         + (f": {top}" if top else ""))
print("\nratio: kubetune tokens/s over transformers' on the same rows and micro batch; for the loss rows, "
      "memory over the old loss's. MFU counts kubetune.train.flops' model FLOPs (padding and recomputation excluded).")
for note in notes:
    print(note)
EOF
}

main() {
    echo "gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), deadline ${DEADLINE_S} s"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    install_wheels
    "$PY" -c "import torch, transformers, peft, deepspeed, pydantic; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__, '| pydantic', pydantic.__version__)"
    echo "setup took $((SECONDS - START)) s"

    bench 1b-full 120 "${SMALL[@]}" --method full --sync-check 2
    bench 1b-full-hf 60 "${SMALL[@]}" --method full --mode transformers $(product_flags 1b-full)
    bench loss-memory 45 --mode loss-memory --loss-shapes "${LOSS[@]}"
    bench 1b-lora 100 "${SMALL[@]}" --method lora --sync-check 2
    bench 1b-lora-hf 60 "${SMALL[@]}" --method lora --mode transformers $(product_flags 1b-lora)
    # The 8B model's set-up and probe alone took over 2 minutes on an H200 (2026-12-04): last, so the deadline
    # cuts it and not the rest; give it its own visit with GPU_CHECK_RUNS="8b-lora 8b-lora-hf" and a longer deadline.
    bench 8b-lora 300 "${BIG[@]}" --method lora
    bench 8b-lora-hf 150 "${BIG[@]}" --method lora --mode transformers $(product_flags 8b-lora)

    table ${GPU_CHECK_RUNS:-1b-full 1b-full-hf loss-memory 1b-lora 1b-lora-hf 8b-lora 8b-lora-hf}
    echo "total $((SECONDS - START)) s"
}

main 2>&1 | tee "$LOG"
rm -rf "$WORK"
