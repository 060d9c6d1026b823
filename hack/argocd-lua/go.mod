module github.com/model-rollouts/model-rollouts/hack/argocd-lua

go 1.23

require github.com/yuin/gopher-lua v1.1.2
