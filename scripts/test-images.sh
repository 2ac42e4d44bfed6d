#!/usr/bin/env bash
# Builds fngate's container images from binaries built on this machine and runs each once, so
# the Dockerfile cannot rot. Uses podman with runc; a Debian base image is made locally with
# debootstrap when missing, because no registry can be reached here. Builds run without
# network.
#
# Usage: scripts/test-images.sh [BINARY_DIR]   (default target/debug; needs fngate and
# fngate-runtime built there)
set -euo pipefail
cd "$(dirname "$0")/.."

binaries=${1:-target/debug}
base=localhost/fngate-base:bookworm
tag=ci-$$
# Where raising resource limits is not allowed (as on this CI machine), podman's default nofile
# and nproc limits make runc fail. The runs therefore set explicit limits below the host's.
podman_flags=(--runtime runc --cgroup-manager=cgroupfs)
run_flags=(--pull=never --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

if ! podman "${podman_flags[@]}" image exists "$base"; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo "test-images: making $base with debootstrap"
    debootstrap --variant=minbase --include=python3,curl,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | podman "${podman_flags[@]}" import - "$base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

context=target/image-context
rm -rf "$context"
mkdir -p "$context/dist"
cp "$binaries/fngate" "$binaries/fngate-runtime" "$context/dist/"

cleanup() {
    podman "${podman_flags[@]}" rm -f "fngate-$tag" "fngate-proxy-$tag" >/dev/null 2>&1 || true
    podman "${podman_flags[@]}" rmi -f "localhost/fngate:$tag" "localhost/runtime:$tag" \
        >/dev/null 2>&1 || true
}
trap cleanup EXIT

for target in fngate runtime; do
    podman "${podman_flags[@]}" build "${run_flags[@]}" --network none --quiet \
        --build-arg "BASE_IMAGE=$base" --target "$target-prebuilt" \
        -f Dockerfile -t "localhost/$target:$tag" "$context" >/dev/null
    user=$(podman "${podman_flags[@]}" image inspect --format '{{.Config.User}}' "localhost/$target:$tag")
    if [[ $user != 65532:65532 ]]; then
        echo "test-images: $target runs as '$user', expected the non-root 65532:65532" >&2
        exit 1
    fi
done

# The runtime wrapper starts inside its image: without settings it exits 2 and names the
# missing variable.
set +e
output=$(podman "${podman_flags[@]}" run --rm "${run_flags[@]}" --network none \
    "localhost/runtime:$tag" 2>&1)
status=$?
set -e
if [[ $status != 2 || $output != *FNGATE_INVOKE_LISTEN* ]]; then
    echo "test-images: runtime image: expected exit 2 naming FNGATE_INVOKE_LISTEN, got $status: $output" >&2
    exit 1
fi

# Starts the fngate image as container `$1` with the remaining arguments, on the host network,
# and checks that /healthz returns ok on the admin address it prints (listeners on port 0 of
# loopback). Sets `admin`.
check_health() {
    local name=$1
    shift
    podman "${podman_flags[@]}" run -d --name "$name" "${run_flags[@]}" --network host "$@" \
        >/dev/null
    admin=""
    for _ in $(seq 1 100); do
        admin=$(podman "${podman_flags[@]}" logs "$name" 2>/dev/null |
            sed -n 's|^fngate: admin listening on http://\([^ ]*\).*|\1|p' | head -n 1)
        [[ -n $admin ]] && break
        sleep 0.1
    done
    if [[ -z $admin ]]; then
        echo "test-images: container $name printed no admin address:" >&2
        podman "${podman_flags[@]}" logs "$name" >&2 || true
        exit 1
    fi
    local health
    health=$(curl -fsS --max-time 5 "http://$admin/healthz")
    if [[ $health != ok* ]]; then
        echo "test-images: /healthz of container $name returned '$health'" >&2
        exit 1
    fi
}

# The control plane: fngate serve.
check_health "fngate-$tag" "localhost/fngate:$tag" serve --listen 127.0.0.1:0 \
    --admin-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 --function-dir /var/lib/fngate
serve_admin=$admin

# A proxy replica: fngate proxy, as the proxy Deployment runs it. Its kubeconfig names a
# server nothing listens on, so it starts and serves /healthz but never becomes ready.
kubeconfig=$context/kubeconfig
cat >"$kubeconfig" <<'YAML'
apiVersion: v1
kind: Config
clusters:
  - name: none
    cluster: {server: "http://127.0.0.1:9"}
users:
  - name: none
    user: {}
contexts:
  - name: none
    context: {cluster: none, user: none}
current-context: none
YAML
chmod 644 "$kubeconfig"
check_health "fngate-proxy-$tag" -v "$(realpath "$kubeconfig"):/etc/fngate/kubeconfig:ro" \
    "localhost/fngate:$tag" proxy --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --control-plane http://127.0.0.1:9 --namespace default --replica image-check \
    --kubeconfig /etc/fngate/kubeconfig
echo "test-images: fngate and runtime images built; fngate serve answered /healthz on" \
    "$serve_admin, fngate proxy on $admin"
