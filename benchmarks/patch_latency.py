"""Per-patch latency of E2ENet against the peers: a thin wrapper over ``napari_e2enet.bench``
(the same code that ``napari-e2enet bench`` runs, shipped in the package).

    python benchmarks/patch_latency.py --sizes 64 128 --repeats 5 --precisions fp32 bf16
"""

from napari_e2enet.bench import format_table, machine_info, main, run_patch_benchmark

__all__ = ["format_table", "machine_info", "main", "run_patch_benchmark"]

if __name__ == "__main__":
    raise SystemExit(main())
