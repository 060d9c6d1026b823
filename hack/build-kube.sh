#!/usr/bin/env bash
# Builds the upstream Kubernetes control-plane binaries the test harness needs,
# once, into a git-ignored cache, from the Go modules pinned in hack/kube/go.mod.
# Prints the directory holding the binaries (usable as KUBEBUILDER_ASSETS).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
KUBE_VERSION=v1.36.3
GATEWAY_API_VERSION=v1.6.3
ISTIO_API_VERSION=v1.32.0
cache=${MODEL_ROLLOUTS_CACHE:-$root/.cache}
out=$cache/kube/$KUBE_VERSION/bin
crd_out=$cache/gateway-api/$GATEWAY_API_VERSION
istio_out=$cache/istio-api/$ISTIO_API_VERSION
export GOMODCACHE=$cache/gomod GOCACHE=$cache/go-build GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
mkdir -p "$out" "$crd_out" "$istio_out"
cd "$root/hack/kube"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
cmds="kube-apiserver kube-controller-manager kubectl"
[ "${1:-}" = "--crds-only" ] && cmds=""
for cmd in $cmds; do
  if [ -x "$out/$cmd" ]; then continue; fi
  echo "building $cmd $KUBE_VERSION (first time only; kube-apiserver takes ~5 min on 2 cores)" >&2
  start=$(date +%s)
  go build -trimpath -ldflags "$ldflags" -o "$out/$cmd.partial" "k8s.io/kubernetes/cmd/$cmd"
  mv "$out/$cmd.partial" "$out/$cmd"
  echo "built $cmd in $(( $(date +%s) - start ))s" >&2
done
if [ ! -f "$crd_out/httproutes.yaml" ]; then
  dir=$(go mod download -json "sigs.k8s.io/gateway-api@$GATEWAY_API_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  for kind in gatewayclasses gateways httproutes referencegrants; do
    cp "$dir/config/crd/standard/gateway.networking.k8s.io_$kind.yaml" "$crd_out/$kind.yaml"
  done
  chmod u+w "$crd_out"/*.yaml
fi
# Istio's CRDs (VirtualService, DestinationRule, Gateway, ...) as generated in the istio.io/api
# module; one file per networking.istio.io CRD, for the harness to install (issue 19).
if [ ! -f "$istio_out/virtualservices.yaml" ]; then
  dir=$(go mod download -json "istio.io/api@$ISTIO_API_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  tmp=$(mktemp -d "$istio_out/.split.XXXXXX")
  # Split the generated multi-document file; keep the networking.istio.io CRDs by their names.
  awk -v dir="$tmp" '
    /^---/ { if (name != "") { close(file) } name = ""; buf = ""; next }
    { buf = buf $0 "\n" }
    /^  name: [a-z]+\.networking\.istio\.io$/ && name == "" {
      name = $2; sub(/\.networking\.istio\.io$/, "", name); file = dir "/" name ".yaml"
      printf "%s", buf > file; buf = ""; next
    }
    name != "" { print > file; buf = "" }
  ' "$dir/kubernetes/customresourcedefinitions.gen.yaml"
  for kind in virtualservices destinationrules gateways serviceentries; do
    grep -q "^kind: CustomResourceDefinition" "$tmp/$kind.yaml"
    mv "$tmp/$kind.yaml" "$istio_out/$kind.yaml"
  done
  rm -rf "$tmp"
  chmod u+w "$istio_out"/*.yaml
fi
echo "$out"
