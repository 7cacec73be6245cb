#!/usr/bin/env bash
# Smoke test of docker-compose.yml on this machine, end to end, on the CPU profile:
#   engine (started if none runs) -> base image (scripts/build-base-image.sh, cached) -> images
#   -> prepare (a Pushshift sample) -> train-rm (a few steps) -> reward-api scaled to 2 replicas, both
#   healthy, each answering /v1/score on its own published port -> trainer completes a PPO step against
#   them over HTTP (KARMA_REWARD_URL = the service name, resolved to both; each replica answers some of its
#   requests) -> down; stops what it started.
# Prints "compose-smoke: PASS" and the time of each phase; exits non-zero on the first failure.
#
# Environment (all optional):
#   BASE_IMAGE          base of the images (default local/python:3.11-bookworm, built here when missing;
#                       python:3.11-slim where a registry is reachable)
#   TORCH_FIND_LINKS    folder URL with the torch wheel; default: $KARMA_WHEELS served on 127.0.0.1 if it
#                       holds one (KARMA_WHEELS default /opt/wheels, port KARMA_WHEEL_PORT default 8765),
#                       else the CPU index
#   KARMA_DOCKER_ROOT   data root of an engine this script starts (default /var/lib/karma-docker; images
#                       stay there between runs, so a second run is warm)
#   KARMA_DOCKER_RUN    its sockets, pid file and log (default /run/karma-docker)
#   KARMA_SMOKE_DIR     bind-mounted data/models/runs/cache/config (default $KARMA_DOCKER_ROOT-smoke)
#   KARMA_SHARED_DATA   the shared data folder (default ../shared/data beside the repository)
#   KARMA_SMOKE_REPLICAS  reward-api replicas (`--scale reward-api=N`, default 2)
#   KARMA_SMOKE_KEEP=1  leave the services up and the engine running (debugging)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DOCKER_ROOT=${KARMA_DOCKER_ROOT:-/var/lib/karma-docker}
RUN_DIR=${KARMA_DOCKER_RUN:-/run/karma-docker}
SMOKE_DIR=${KARMA_SMOKE_DIR:-$DOCKER_ROOT-smoke}
SHARED_DATA=${KARMA_SHARED_DATA:-$(dirname "$ROOT")/shared/data}
BASE_IMAGE=${BASE_IMAGE:-local/python:3.11-bookworm}
WHEELS=${KARMA_WHEELS:-/opt/wheels}
WHEEL_PORT=${KARMA_WHEEL_PORT:-8765}
KEEP=${KARMA_SMOKE_KEEP:-0}
REPLICAS=${KARMA_SMOKE_REPLICAS:-2}
UID_IN_IMAGE=${KARMA_UID:-1000}
PROJECT=karma-smoke
RAW=$SHARED_DATA/reddit/college_2011_2022

T0=$SECONDS
declare -a TIMES=()
phase_start=$SECONDS
log() { printf '[%s] compose-smoke: %s\n' "$(date +%T)" "$*"; }
die() { log "FAIL: $*" >&2; exit 1; }
phase() { # phase NAME: start timing a phase (took NAME records it)
    phase_start=$SECONDS
    log "--- $1"
}
took() { TIMES+=("$(printf '%-22s %4d s' "$1" $((SECONDS - phase_start)))"); }

started_engine=0
wheel_pid=
compose_used=0
cleanup() {
    local rc=$?
    set +e
    if ((compose_used)); then
        if ((rc != 0)); then
            log "service logs (last 60 lines each):"
            compose logs --no-color --tail 60 >&2
        fi
        if [[ $KEEP == 1 ]]; then
            log "KARMA_SMOKE_KEEP=1: services left up (project $PROJECT)"
        else
            compose down --volumes --remove-orphans >/dev/null 2>&1
        fi
    fi
    [[ -n $wheel_pid ]] && kill "$wheel_pid" 2>/dev/null
    if ((started_engine)) && [[ $KEEP != 1 ]]; then
        log "stopping the engine this script started"
        local pid
        pid=$(cat "$RUN_DIR/dockerd.pid" 2>/dev/null)
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null
            for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
        # dockerd leaves this mount behind
        mountpoint -q "$RUN_DIR/exec/netns/default" 2>/dev/null && umount "$RUN_DIR/exec/netns/default"
    fi
    if ((rc == 0)); then
        log "PASS in $((SECONDS - T0)) s"
        printf '  %s\n' "${TIMES[@]}"
        echo "compose-smoke: PASS"
    else
        log "FAILED (exit $rc) after $((SECONDS - T0)) s"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------------------------- engine
phase engine
engine_up() { timeout 20 docker info >/dev/null 2>&1; }
if engine_up; then
    log "using the running engine (${DOCKER_HOST:-default socket})"
elif DOCKER_HOST=unix://$RUN_DIR/docker.sock engine_up; then
    export DOCKER_HOST=unix://$RUN_DIR/docker.sock
    log "using the running engine at $DOCKER_HOST"
else
    command -v dockerd >/dev/null || PATH=$PATH:/usr/sbin
    command -v dockerd >/dev/null || die "no Docker engine runs and dockerd is not installed (apt-get install docker.io)"
    [[ $(id -u) == 0 ]] || die "no Docker engine runs; starting one needs root"
    mkdir -p "$RUN_DIR/exec" "$DOCKER_ROOT"
    export DOCKER_HOST=unix://$RUN_DIR/docker.sock
    log "starting dockerd (data root $DOCKER_ROOT, socket $RUN_DIR/docker.sock)"
    # No iptables and no default bridge: compose's own network still connects the services.
    setsid dockerd --storage-driver=overlay2 --iptables=false --bridge=none \
        --data-root "$DOCKER_ROOT" --exec-root "$RUN_DIR/exec" --pidfile "$RUN_DIR/dockerd.pid" \
        -H "$DOCKER_HOST" >"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
    started_engine=1
    for _ in $(seq 60); do engine_up && break; sleep 1; done
    engine_up || { tail -20 "$RUN_DIR/dockerd.log" >&2; die "dockerd did not come up (log: $RUN_DIR/dockerd.log)"; }
fi

# BuildKit: the engine's own CLI has it built in; a newer CLI needs the buildx plugin.
if docker buildx version >/dev/null 2>&1; then
    buildkit=1
elif [[ -x /usr/bin/docker && $(/usr/bin/docker version -f '{{.Client.Version}}' 2>/dev/null) == 20.* ]]; then
    PATH=/usr/bin:$PATH
    buildkit=1
else
    buildkit=0
fi
export DOCKER_BUILDKIT=$buildkit COMPOSE_DOCKER_CLI_BUILD=$buildkit

if command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    die "neither docker-compose nor the docker compose plugin is installed"
fi
compose() { "${COMPOSE[@]}" --project-name "$PROJECT" --env-file "$SMOKE_DIR/smoke.env" "$@"; }
took engine

# ------------------------------------------------------------------------------------------- images
phase "base image"
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ $BASE_IMAGE == local/* ]]; then
        scripts/build-base-image.sh "$BASE_IMAGE"
    else
        docker pull "$BASE_IMAGE" || die "cannot pull $BASE_IMAGE (no registry? use the default local/ base)"
    fi
fi
took "base image"

if [[ -z ${TORCH_FIND_LINKS:-} ]] && compgen -G "$WHEELS/torch-*.whl" >/dev/null; then
    python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', $WHEEL_PORT))" 2>/dev/null \
        || die "port $WHEEL_PORT is taken: set KARMA_WHEEL_PORT"
    python3 -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$WHEEL_PORT" >/dev/null 2>&1 &
    wheel_pid=$!
    TORCH_FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/
    for _ in $(seq 50); do python3 -c "import urllib.request; urllib.request.urlopen('$TORCH_FIND_LINKS')" \
        2>/dev/null && break; sleep 0.2; done
    log "serving $WHEELS at $TORCH_FIND_LINKS for the torch wheel"
fi

# --------------------------------------------------------------------------------- the run's settings
[[ -f $RAW/RC_college.zst && -f $RAW/RS_college.zst ]] || die "shared data not found: $RAW (set KARMA_SHARED_DATA)"
rm -rf "$SMOKE_DIR/data" "$SMOKE_DIR/models" "$SMOKE_DIR/runs" "$SMOKE_DIR/config"
mkdir -p "$SMOKE_DIR"/{data,models,runs,cache,config}
cat >"$SMOKE_DIR/config/smoke.yaml" <<'YAML'
# scripts/compose-smoke.sh: one tiny PPO step
rollout:
  max_new_tokens: 8
ppo:
  prompts_per_step: 2
  mini_batch_size: 2
  micro_batch_size: 2
  epochs: 1
run:
  steps: 1
  save_every: 0
  report_to: [jsonl]
YAML
chown -R "$UID_IN_IMAGE:$UID_IN_IMAGE" "$SMOKE_DIR"
cat >"$SMOKE_DIR/smoke.env" <<EOF
BASE_IMAGE=$BASE_IMAGE
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-}
KARMA_UID=$UID_IN_IMAGE
KARMA_RAW_DIR=$RAW
KARMA_DATA_VOLUME=$SMOKE_DIR/data
KARMA_MODELS_VOLUME=$SMOKE_DIR/models
KARMA_RUNS_VOLUME=$SMOKE_DIR/runs
KARMA_CACHE_VOLUME=$SMOKE_DIR/cache
KARMA_CONFIG_DIR=$SMOKE_DIR/config
KARMA_TRAIN_CONFIG=smoke.yaml
KARMA_PREPARE_ARGS=--comments /raw/RC_college.zst --submissions /raw/RS_college.zst --limit 6000 --workers 1
KARMA_RM_TRAIN_ARGS=--max-steps 4 --max-train 64 --batch-size 8 --max-length 64 --eval-steps 4 --threads 2
KARMA_REWARD_PUBLISH=127.0.0.1:
KARMA_LOG_LEVEL=debug
KARMA_TRAIN_ARGS=--max-prompts 8
EOF
compose_used=1

phase "build images"
compose --profile cpu --profile pipeline build --quiet >"$SMOKE_DIR/build.log" 2>&1 \
    || { tail -40 "$SMOKE_DIR/build.log" >&2; die "image build failed (log: $SMOKE_DIR/build.log)"; }
took "build images"

# ------------------------------------------------------------------------------------------ pipeline
phase prepare
compose --profile pipeline run --rm -T prepare || die "prepare failed"
[[ -f $SMOKE_DIR/data/prepared/examples.parquet && -f $SMOKE_DIR/data/prepared/pairs.parquet ]] \
    || die "prepare wrote no examples.parquet / pairs.parquet"
took prepare

phase train-rm
compose --profile pipeline run --rm -T train-rm || die "train-rm failed"
[[ -f $SMOKE_DIR/models/karma-rm/karma_rm.json ]] || die "train-rm wrote no RM folder (karma_rm.json)"
took train-rm

phase "reward-api x$REPLICAS healthy"
# --scale: replicas of one service, no container_name, each published on its own free loopback port
compose --profile cpu up -d --no-build --scale reward-api="$REPLICAS" reward-api
mapfile -t containers < <(compose --profile cpu ps -q reward-api)
((${#containers[@]} == REPLICAS)) || die "expected $REPLICAS reward-api containers, found ${#containers[@]}"
for container in "${containers[@]}"; do
    status=starting
    for _ in $(seq 300); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$container")
        [[ $status == healthy || $status == unhealthy ]] && break
        [[ $(docker inspect -f '{{.State.Running}}' "$container") == true ]] || die "reward-api $container exited"
        sleep 1
    done
    [[ $status == healthy ]] || die "reward-api $container is $status, not healthy"
done
took "reward-api x$REPLICAS healthy"

phase "score over HTTP"
# every replica on its own published port; the same model answers the same scores
replica_urls=()
for i in $(seq "$REPLICAS"); do
    published=$(compose --profile cpu port --index "$i" reward-api 8000) || die "no published port for replica $i"
    replica_urls+=("http://${published/0.0.0.0/127.0.0.1}")
done
python3 - "${replica_urls[@]}" <<'PY' || die "/v1/score did not answer as expected"
import json, math, sys, urllib.request

items = [
    {"context": "How do I pick a major?", "response": "Take intro classes in a few and see what you enjoy."},
    {"context": "How do I pick a major?", "response": "lol"},
]
answers = []
for base in sys.argv[1:]:
    req = urllib.request.Request(base + "/v1/score", data=json.dumps({"items": items}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.load(r)
    scores = body["scores"]
    assert len(scores) == 2 and all(isinstance(s, float) and math.isfinite(s) for s in scores), body
    print(f"  {base}/v1/score: model={body['model']} scores={[round(s, 4) for s in scores]}")
    answers.append((body["version"], scores))
(version, first), *rest = answers
for v, scores in rest:
    assert v == version and all(abs(a - b) <= 1e-5 for a, b in zip(first, scores)), answers
PY
took "score over HTTP"

# scoring requests each replica answered so far (uvicorn's access log, on at KARMA_LOG_LEVEL=debug)
scored() { docker logs "$1" 2>&1 | grep -c 'POST /v1/score' || true; }
declare -A before=()
for container in "${containers[@]}"; do before[$container]=$(scored "$container"); done

phase "trainer step"
# the trainer's KARMA_REWARD_URL is the service name: it resolves to every replica (--scale again, or
# compose would scale reward-api back to 1 when it starts the trainer's dependencies)
compose --profile cpu up --no-build --scale reward-api="$REPLICAS" --exit-code-from trainer trainer \
    >"$SMOKE_DIR/trainer.log" 2>&1 \
    || { tail -40 "$SMOKE_DIR/trainer.log" >&2; die "trainer failed (log: $SMOKE_DIR/trainer.log)"; }
grep -E "at step 1\b" "$SMOKE_DIR/trainer.log" | tail -1
grep -qE "at step 1\b" "$SMOKE_DIR/trainer.log" || die "the trainer did not report step 1"
metrics=$(find "$SMOKE_DIR/runs/ppo" -name '*.jsonl' | head -1)
[[ -n $metrics ]] || die "the trainer wrote no metrics (*.jsonl) under runs/ppo"
python3 - "$metrics" <<'PY' || die "no step-1 record with rewards and losses in $metrics"
import json, math, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
step = [r for r in rows if r.get("step") == 1]
assert step, rows
m = step[-1]
for key in ("reward/mean", "reward/std", "loss/policy", "policy/approx_kl"):
    assert isinstance(m.get(key), float) and math.isfinite(m[key]), (key, m)
print("  step 1:", {k: round(m[k], 4) for k in ("reward/mean", "reward/std", "loss/policy", "speed/step_s")})
PY
# the trainer balanced over the replicas it discovered: each answered some of its scoring requests
# (a step's rollouts and the held-out base and trained replies: at least 3 requests, round-robin)
for container in "${containers[@]}"; do
    n=$(($(scored "$container") - before[$container]))
    log "  replica ${container:0:12}: $n scoring request(s) from the trainer"
    ((n > 0)) || die "replica ${container:0:12} got no scoring request from the trainer (discovery over DNS?)"
done
took "trainer step"
