"""The local cluster's controllers (`manager.Controllers`): Job, garbage collector, namespace and
CRD lifecycle, TTL-after-finished."""
