//go:build tools

// Package kubetools only records the upstream commands built by hack/build-kube.sh.
package kubetools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "sigs.k8s.io/gateway-api/apis/v1"
)
