"""The local cluster's node: the kubelet, the pods' init process, and pod networking."""
