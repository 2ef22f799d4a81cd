#!/usr/bin/env bash
# Deploy the SyncHire interview agent to Cloud Run as the service sync-hire-agent, from any copy
# of the repository (a git checkout or not). docs/DEPLOYMENT.md explains the one-time setup.
#
#   deploy/deploy-cloud-run.sh [production|development] [--dry-run]
#
#   production (default)  ENVIRONMENT=production: needs the secrets API_SECRET_KEY,
#                         GEMINI_API_KEY, ELEVENLABS_API_KEY and NEXTJS_WEBHOOK_URL
#   development           ENVIRONMENT=development: only API_SECRET_KEY is needed (shared by all
#                         instances); the offline stand-ins replace whatever key is missing
#   --dry-run             print every command; run only those that read (nothing is created,
#                         built, pushed or deployed); exit 1 if a real run would stop
#
# Environment (all optional except NEXTJS_WEBHOOK_URL in production):
#   GCP_PROJECT_ID      project                      (default: gcloud's configured project)
#   GCP_REGION          region                       (default: us-central1)
#   NEXTJS_WEBHOOK_URL  the web app's base URL; results go to {url}/api/webhooks/interview-complete
#   SERVICE_NAME        Cloud Run service            (default: sync-hire-agent)
#   AR_REPOSITORY       Artifact Registry repository (default: sync-hire)
#   SERVICE_ACCOUNT     the service's identity
#                       (default: sync-hire-agent@PROJECT.iam.gserviceaccount.com)
#   OUTBOX_BUCKET       bucket behind the outbox     (default: PROJECT-sync-hire-outbox)
#   EXTRA_ENV_VARS      more settings, KEY=VALUE,... (e.g. MAX_INTERVIEWS=8,LOG_LEVEL=DEBUG)
#   IMAGE_TAG           image tag                    (default: git short hash + UTC time)
#   USE_CLOUD_BUILD=1   build with Cloud Build even where Docker runs (used when it does not)
#   HEALTH_RETRIES      retries of the final /health check (default: 10, 3 s apart)
#
# The nine steps: prerequisites; APIs; secrets (checked before anything is built, every missing
# one named); Artifact Registry repository; Docker auth; build; push; deploy; /health.
# A second run creates nothing that exists: it builds, pushes and deploys a new revision.
# The deploy flags match cloudbuild.yaml (tests/test_deploy.py checks that they do).

set -euo pipefail

readonly SERVICE_DEFAULT=sync-hire-agent
readonly PORT=8080                 # the container port; Cloud Run passes it to the server as PORT
readonly OUTBOX_MOUNT=/var/outbox  # OUTBOX_DIR in the Dockerfile
readonly APIS=(
    run.googleapis.com
    artifactregistry.googleapis.com
    cloudbuild.googleapis.com
    secretmanager.googleapis.com
)
# Secret Manager secrets, named like the environment variables they become.
readonly REQUIRED_PRODUCTION=(API_SECRET_KEY GEMINI_API_KEY ELEVENLABS_API_KEY)
readonly REQUIRED_DEVELOPMENT=(API_SECRET_KEY)
readonly ALL_SECRETS=(
    API_SECRET_KEY           # the web app's X-API-Key
    API_SECRET_KEY_PREVIOUS  # optional: the old key, still accepted during a rotation
    WEBHOOK_SECRET           # optional: signs the completion webhook (else API_SECRET_KEY does)
    GEMINI_API_KEY           # the interviewer (production)
    ELEVENLABS_API_KEY       # its voice (production)
    HEYGEN_API_KEY           # optional: the video avatar
    STREAM_API_KEY           # optional, with STREAM_API_SECRET: the GetStream video edge
    STREAM_API_SECRET
    ICE_SERVERS              # optional: STUN/TURN servers with their credentials (direct WebRTC)
)

# Progress goes to fd 3 (stderr), so that a command's own 2>/dev/null never hides it.
exec 3>&2
say() { printf '%s\n' "$*" >&3; }
die() {
    say "error: $*"
    exit 1
}
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

STEP=0
step() {
    STEP=$((STEP + 1))
    say ""
    say "[$STEP/9] $*"
}

# Print a command as it would be typed (single quotes only where the shell needs them).
show() {
    local line="+" arg
    for arg in "$@"; do
        if [[ -n $arg && $arg != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
            line+=" $arg"
        else
            line+=" '${arg//\'/\'\\\'\'}'"
        fi
    done
    say "$line"
}
# A command that only reads: printed, and run even in a dry run.
query() {
    show "$@"
    "$@"
}
# A command that changes something: printed, and run only for real.
change() {
    show "$@"
    if ((DRY_RUN)); then
        return 0
    fi
    "$@"
}

contains() {
    local needle=$1 item
    shift
    for item in "$@"; do
        [[ $item == "$needle" ]] && return 0
    done
    return 1
}

join_by() {
    local IFS=$1
    shift
    printf '%s' "$*"
}

# --- arguments and settings -------------------------------------------------------------------

DRY_RUN=0
ENVIRONMENT_NAME=production
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        production | development) ENVIRONMENT_NAME=$arg ;;
        *)
            say "unknown argument: $arg (expected production, development or --dry-run)"
            exit 2
            ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REGION=${GCP_REGION:-us-central1}
SERVICE=${SERVICE_NAME:-$SERVICE_DEFAULT}
REPOSITORY=${AR_REPOSITORY:-sync-hire}
WEBHOOK_URL=${NEXTJS_WEBHOOK_URL:-}
HEALTH_RETRIES=${HEALTH_RETRIES:-10}
export CLOUDSDK_CORE_DISABLE_PROMPTS=1 # never wait for an answer
PROBLEMS=()

if [[ $ENVIRONMENT_NAME == production ]]; then
    REQUIRED=("${REQUIRED_PRODUCTION[@]}")
else
    REQUIRED=("${REQUIRED_DEVELOPMENT[@]}")
fi
((DRY_RUN)) && say "Dry run: commands that change anything are printed, not run."

# --- 1. prerequisites -------------------------------------------------------------------------

step "Prerequisites"
command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install)"
command -v curl >/dev/null 2>&1 || die "curl not found (needed for the /health check)"
[[ -f $ROOT/Dockerfile ]] ||
    die "no Dockerfile in $ROOT: run this script from a copy of the repository"

if [[ -n ${GCP_PROJECT_ID:-} ]]; then
    PROJECT=$GCP_PROJECT_ID
else
    PROJECT=$(query gcloud config get-value project 2>/dev/null || true)
fi
[[ -n $PROJECT && $PROJECT != "(unset)" ]] ||
    die "no project: set GCP_PROJECT_ID or run: gcloud config set project PROJECT_ID"

if [[ ${USE_CLOUD_BUILD:-0} == 1 ]]; then
    BUILDER=cloudbuild
    say "USE_CLOUD_BUILD=1: the image is built by Cloud Build."
elif command -v docker >/dev/null 2>&1 && query docker info >/dev/null 2>&1; then
    BUILDER=docker
else
    BUILDER=cloudbuild
    say "Docker is not available here: the image is built by Cloud Build instead."
fi

if [[ $ENVIRONMENT_NAME == production && -z $WEBHOOK_URL ]]; then
    PROBLEMS+=("NEXTJS_WEBHOOK_URL is not set: production sends every result to the web app")
fi
if [[ -n $WEBHOOK_URL && ! $WEBHOOK_URL =~ ^https?://[^,[:space:]]+$ ]]; then
    die "NEXTJS_WEBHOOK_URL must be an http(s) URL without commas or spaces"
fi
EXTRA=()
if [[ -n ${EXTRA_ENV_VARS:-} ]]; then
    IFS=, read -r -a EXTRA <<<"$EXTRA_ENV_VARS"
    for pair in "${EXTRA[@]}"; do
        key=${pair%%=*}
        [[ $pair == *=* && $key =~ ^[A-Z][A-Z0-9_]*$ ]] ||
            die "EXTRA_ENV_VARS: '$pair' is not KEY=VALUE"
        [[ $key != PORT ]] || die "EXTRA_ENV_VARS: PORT is reserved by Cloud Run"
        ! contains "$key" "${ALL_SECRETS[@]}" ||
            die "EXTRA_ENV_VARS: $key is a secret: store it in Secret Manager instead"
    done
fi

SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-$SERVICE_DEFAULT@$PROJECT.iam.gserviceaccount.com}
BUCKET=${OUTBOX_BUCKET:-$PROJECT-sync-hire-outbox}
HOST=$REGION-docker.pkg.dev
if [[ -z ${IMAGE_TAG:-} ]]; then
    sha=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)
    IMAGE_TAG=${sha:+$sha-}$(date -u +%Y%m%d-%H%M%S)
fi
IMAGE=$HOST/$PROJECT/$REPOSITORY/$SERVICE:$IMAGE_TAG

say "project $PROJECT, region $REGION, service $SERVICE ($ENVIRONMENT_NAME)"
say "image $IMAGE (built with $BUILDER)"

# --- 2. APIs ----------------------------------------------------------------------------------

step "APIs"
enabled=$(query gcloud services list --enabled --project="$PROJECT" --format='value(config.name)')
missing_apis=()
for api in "${APIS[@]}"; do
    grep -qxF "$api" <<<"$enabled" || missing_apis+=("$api")
done
if ((${#missing_apis[@]})); then
    change gcloud services enable "${missing_apis[@]}" --project="$PROJECT" --quiet
else
    say "all enabled"
fi

# --- 3. secrets, service account, outbox bucket (before anything is built) --------------------

step "Secrets, service account and outbox bucket"
secret_ready() {
    local state
    state=$(query gcloud secrets versions describe latest --secret="$1" --project="$PROJECT" \
        --format='value(state)' 2>/dev/null) || return 1
    [[ $state == ENABLED ]]
}
PRESENT=()
for name in "${ALL_SECRETS[@]}"; do
    if secret_ready "$name"; then
        PRESENT+=("$name")
        say "  $name: ok"
    elif contains "$name" "${REQUIRED[@]}"; then
        say "  $name: MISSING (required)"
        fix="printf %s \"\$VALUE\" | gcloud secrets create $name --data-file=-"
        PROBLEMS+=("secret $name is missing (or has no enabled version): $fix --project=$PROJECT")
    else
        say "  $name: not set (optional)"
    fi
done
has_key=0 has_secret=0
contains STREAM_API_KEY ${PRESENT[@]+"${PRESENT[@]}"} && has_key=1
contains STREAM_API_SECRET ${PRESENT[@]+"${PRESENT[@]}"} && has_secret=1
if ((has_key != has_secret)); then
    PROBLEMS+=("STREAM_API_KEY and STREAM_API_SECRET go together: create both or neither")
fi
if ! query gcloud iam service-accounts describe "$SERVICE_ACCOUNT" --project="$PROJECT" \
    --format='value(email)' >/dev/null 2>&1; then
    PROBLEMS+=("service account $SERVICE_ACCOUNT does not exist (docs/DEPLOYMENT.md, section 2)")
fi
if ! query gcloud storage buckets describe "gs://$BUCKET" --project="$PROJECT" \
    --format='value(name)' >/dev/null 2>&1; then
    PROBLEMS+=("bucket gs://$BUCKET for the outbox does not exist (docs/DEPLOYMENT.md, section 3)")
fi
if ((${#PROBLEMS[@]})); then
    say ""
    say "A real run would stop here, before building anything:"
    for problem in "${PROBLEMS[@]}"; do
        say "  - $problem"
    done
    ((DRY_RUN)) || exit 1
fi

# What the service gets: every required secret, and the optional ones that exist.
SECRET_PAIRS=()
for name in "${ALL_SECRETS[@]}"; do
    if contains "$name" "${REQUIRED[@]}" || contains "$name" ${PRESENT[@]+"${PRESENT[@]}"}; then
        SECRET_PAIRS+=("$name=$name:latest")
    fi
done
ENV_PAIRS=("ENVIRONMENT=$ENVIRONMENT_NAME")
[[ -n $WEBHOOK_URL ]] && ENV_PAIRS+=("NEXTJS_WEBHOOK_URL=$WEBHOOK_URL")
ENV_PAIRS+=(
    "OUTBOX_DIR=$OUTBOX_MOUNT"
    "SHUTDOWN_GRACE_SECONDS=8"       # drain within Cloud Run's 10 s between SIGTERM and SIGKILL
    "GOOGLE_CLOUD_PROJECT=$PROJECT"  # links log lines to Cloud Trace
)
ENV_PAIRS+=(${EXTRA[@]+"${EXTRA[@]}"})

# --- 4. Artifact Registry repository ----------------------------------------------------------

step "Artifact Registry repository $REPOSITORY"
if query gcloud artifacts repositories describe "$REPOSITORY" --location="$REGION" \
    --project="$PROJECT" --format='value(name)' >/dev/null 2>&1; then
    say "exists"
else
    change gcloud artifacts repositories create "$REPOSITORY" --repository-format=docker \
        --location="$REGION" --project="$PROJECT" \
        --description="SyncHire interview agent images" --quiet
fi

# --- 5. Docker auth ---------------------------------------------------------------------------

step "Docker auth for $HOST"
if [[ $BUILDER == docker ]]; then
    docker_config=${DOCKER_CONFIG:-$HOME/.docker}/config.json
    if [[ -f $docker_config ]] && grep -qF "\"$HOST\"" "$docker_config"; then
        say "already configured in $docker_config"
    else
        change gcloud auth configure-docker "$HOST" --quiet
    fi
else
    say "not needed: Cloud Build pushes with its own credentials"
fi

# --- 6. build (linux/amd64, what Cloud Run runs) ----------------------------------------------

step "Build"
if [[ $BUILDER == docker ]]; then
    change docker build --platform=linux/amd64 --tag="$IMAGE" "$ROOT"
else
    # Cloud Build's workers are linux/amd64; --tag builds the Dockerfile and pushes the image.
    change gcloud builds submit "$ROOT" --tag="$IMAGE" --project="$PROJECT" --quiet
fi

# --- 7. push ----------------------------------------------------------------------------------

step "Push"
if [[ $BUILDER == docker ]]; then
    change docker push "$IMAGE"
else
    say "pushed by Cloud Build in step 6"
fi

# --- 8. deploy (the same flags as cloudbuild.yaml) --------------------------------------------

step "Deploy $SERVICE"
previous=$(query gcloud run services describe "$SERVICE" --region="$REGION" --project="$PROJECT" \
    --format='value(status.latestReadyRevisionName)' 2>/dev/null || true)
DEPLOY_FLAGS=(
    --image="$IMAGE"
    --region="$REGION"
    --project="$PROJECT"
    --platform=managed
    --service-account="$SERVICE_ACCOUNT"
    # Public, as Firebase Hosting's /python-api/** rewrite needs; every route but /health
    # checks X-API-Key itself.
    --allow-unauthenticated
    --port="$PORT"
    --memory=2Gi
    --cpu=2
    --min-instances=1
    --max-instances=10
    --timeout=3600   # Cloud Run's maximum; the media is not HTTP, requests are short
    --concurrency=10 # requests per instance; MAX_INTERVIEWS (10) bounds the interviews
    # CPU always allocated: interviews run after the request that started them has returned.
    --no-cpu-throttling
    # Best effort: requests carrying Cloud Run's affinity cookie return to the same instance.
    --session-affinity
    # Extra CPU while starting: shorter cold starts when Cloud Run scales out.
    --cpu-boost
    # gen2: needed for the Cloud Storage volume.
    --execution-environment=gen2
    # Ready only once /health answers (Cloud Run ignores the Dockerfile's HEALTHCHECK).
    "--startup-probe=httpGet.path=/health,periodSeconds=3,timeoutSeconds=2,failureThreshold=20"
    # The results outbox on Cloud Storage: a killed instance's results are sent by the next.
    --add-volume="name=outbox,type=cloud-storage,bucket=$BUCKET"
    --add-volume-mount="volume=outbox,mount-path=$OUTBOX_MOUNT"
    # Never PORT here: Cloud Run reserves it. SHUTDOWN_GRACE_SECONDS fits the 10 s after SIGTERM.
    --set-env-vars="$(join_by , "${ENV_PAIRS[@]}")"
    --set-secrets="$(join_by , "${SECRET_PAIRS[@]}")"
    --quiet
)
change gcloud run deploy "$SERVICE" "${DEPLOY_FLAGS[@]}"

# --- 9. /health -------------------------------------------------------------------------------

step "Health"
describe=(gcloud run services describe "$SERVICE" --region="$REGION" --project="$PROJECT"
    --format='value(status.url)')
if ((DRY_RUN)); then
    show "${describe[@]}"
    show curl --fail --silent --show-error "SERVICE_URL/health"
    say ""
    if ((${#PROBLEMS[@]})); then
        say "Dry run finished: ${#PROBLEMS[@]} problem(s) above would stop a real run."
        exit 1
    fi
    say "Dry run finished: nothing was changed."
    exit 0
fi
url=$(query "${describe[@]}")
[[ -n $url ]] || die "gcloud reported no URL for $SERVICE"
rollback() {
    if [[ -n $previous ]]; then
        say "Roll back with: gcloud run services update-traffic $SERVICE --region=$REGION" \
            "--project=$PROJECT --to-revisions=$previous=100"
    fi
}
if ! body=$(query curl --fail --silent --show-error --max-time 10 --retry "$HEALTH_RETRIES" \
    --retry-delay 3 --retry-all-errors "$url/health"); then
    say "error: $url/health did not answer 200"
    rollback
    exit 1
fi
say "$body"
if ! grep -Eq '"config_valid"[[:space:]]*:[[:space:]]*true' <<<"$body"; then
    say "error: the service runs but config_valid is false:" \
        "GET $url/ with X-API-Key lists what is missing"
    rollback
    exit 1
fi
say ""
say "Deployed: $url (revision of $IMAGE)"
