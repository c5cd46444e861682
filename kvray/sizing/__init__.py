"""Sizing without a GPU: the full-size stages under fake tensors (`meter`: FLOPs and live storage),
and the cost profiles the planner sizes pools with (`estimate`)."""
