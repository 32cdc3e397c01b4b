"""Composition cost: validate + build a 10,000-instance container, and a resolved provider call.

Peers measured in the same run: a hand-built dependency-injector DynamicContainer of the same
shape (no validation), and a plain dict lookup for the call.

    python benches/container_bench.py [--instances N]
"""

from __future__ import annotations

import argparse
import time
import timeit
from typing import Any

from dependency_injector import containers, providers

from castore_di import load_container, load_graph
from castore_di.composition import build_container
from castore_di.composition.loader import read_config


def make_config(n: int) -> dict[str, Any]:
    """n blob instances: memory leaves and combined pairs over earlier instances."""
    blobs: dict[str, Any] = {}
    for i in range(n):
        if i < 2 or i % 3:
            blobs[f"s{i}"] = {"type": "memory"}
        else:
            blobs[f"s{i}"] = {"type": "combined", "local": f"s{i - 1}", "remote": f"s{i - 2}"}
    blobs["default"] = {"type": "combined", "local": f"s{n - 2}", "remote": f"s{n - 3}"}
    return {"blobservices": blobs}


def best(fn: Any, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def raw_di(config: dict[str, Any]) -> containers.DynamicContainer:
    c = containers.DynamicContainer()
    for name, spec in config["blobservices"].items():
        if spec["type"] == "memory":
            setattr(c, name, providers.ThreadSafeSingleton(dict))
        else:
            setattr(c, name, providers.ThreadSafeSingleton(dict, a=getattr(c, spec["local"]), b=getattr(c, spec["remote"])))
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=10_000)
    args = ap.parse_args()
    config = make_config(args.instances)

    t_read = best(lambda: read_config(config))
    t_graph = best(lambda: load_graph(config))
    graph = load_graph(config)
    t_build = best(lambda: build_container(graph))
    t_total = best(lambda: load_container(config))
    t_raw = best(lambda: raw_di(config))

    container = load_container(config)
    provider = container.blobservices.default
    provider()
    n = 200_000
    call = min(timeit.repeat(provider, number=n, repeat=5)) / n
    accessor = min(timeit.repeat(lambda: container.blob_service("default"), number=n, repeat=5)) / n
    d = {"default": provider()}
    lookup = min(timeit.repeat(lambda: d["default"], number=n, repeat=5)) / n
    raw = raw_di(config)
    raw.default()
    raw_call = min(timeit.repeat(raw.default, number=n, repeat=5)) / n

    rows = [
        ("parse + env interpolation", t_read * 1e3, "ms", None),
        ("graph: structure + validate + cycle check", t_graph * 1e3, "ms", None),
        ("providers: build container from graph", t_build * 1e3, "ms", t_build / t_raw),
        ("load_container total", t_total * 1e3, "ms", t_total / t_raw),
        ("peer: raw DI container, same shape, no checks", t_raw * 1e3, "ms", 1.0),
        ("resolved provider call", call * 1e9, "ns", call / lookup),
        ("typed accessor container.blob_service()", accessor * 1e9, "ns", accessor / lookup),
        ("peer: raw DI ThreadSafeSingleton call", raw_call * 1e9, "ns", raw_call / lookup),
        ("peer: dict lookup", lookup * 1e9, "ns", 1.0),
    ]
    print(f"container of {len(config['blobservices'])} instances")
    print(f"{'measure':<48} {'value':>10} {'unit':<4} {'ratio':>7}")
    for name, value, unit, ratio in rows:
        print(f"{name:<48} {value:>10.2f} {unit:<4} {'' if ratio is None else f'{ratio:.2f}x':>7}")
    print("(ratios: build rows vs the raw DI build; call rows vs a dict lookup)")


if __name__ == "__main__":
    main()
