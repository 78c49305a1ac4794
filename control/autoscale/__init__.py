"""The autoscaler (``hpcgate control autoscaler``): a pure policy, its signals and its daemon."""
