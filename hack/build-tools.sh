#!/usr/bin/env bash
# Builds the install-tooling binaries once, into the git-ignored cache, from their pinned Go
# modules (as hack/build-kube.sh does for Kubernetes): helm, helm-unittest (untt), kubeconform,
# and argocd-lua (hack/argocd-lua: Argo CD's Lua sandbox on gopher-lua v1.1.2, for the health and
# action checks of tests/install/test_argocd_lua.py; rebuilt when its source changes).
# Prints the directory holding them. `go install mod@version` builds with the module's own
# go.mod/go.sum, checked against the checksum database, so the dependency set is pinned too.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
HELM_VERSION=v3.22.0
HELM_UNITTEST_VERSION=v1.1.2
KUBECONFORM_VERSION=v0.8.0
cache=${MODEL_ROLLOUTS_CACHE:-$root/.cache}
out=$cache/tools/bin
export GOMODCACHE=$cache/gomod GOCACHE=$cache/go-build GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
mkdir -p "$out"
cd "$root"

build() {  # name version package [ldflags]; package "module@version//subdir" builds inside the module
  local name=$1 version=$2 pkg=$3 ldflags=${4:-}
  local stamp="$out/.$name.version"
  if [ -x "$out/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version $ldflags" ]; then return; fi
  echo "building $name $version (first time only)" >&2
  local start tmp
  start=$(date +%s)
  tmp=$(mktemp -d "$out/.build.XXXXXX")
  if [[ $pkg == ./* ]]; then
    # A module of this repository, with its own go.mod and go.sum.
    (cd "$root/$pkg" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/$name" .)
  elif [[ $pkg == *//* ]]; then
    # A module with replace directives cannot be `go install`ed by version: build it as the main
    # module, in its (checksum-verified) copy in the module cache, with its own go.sum.
    local mod=${pkg%%//*} sub=${pkg#*//} dir
    dir=$(go mod download -json "$mod@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    (cd "$dir" && GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp/$name" "./$sub")
  else
    GOBIN=$tmp go install -trimpath -ldflags "-s -w $ldflags" "$pkg@$version"
  fi
  mv "$tmp"/* "$out/$name"
  rmdir "$tmp"
  echo "$version $ldflags" >"$stamp"
  echo "built $name in $(( $(date +%s) - start ))s" >&2
}

build helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean
 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37
 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37"
build untt "$HELM_UNITTEST_VERSION" github.com/helm-unittest/helm-unittest//cmd/helm-unittest
build kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform
argocd_lua_version=$(cat hack/argocd-lua/go.mod hack/argocd-lua/go.sum hack/argocd-lua/*.go | sha256sum | cut -c1-16)
build argocd-lua "$argocd_lua_version" ./hack/argocd-lua
echo "$out"
