"""Composition cost: validate + build a 10,000-instance container, and a resolved provider call.

The config mixes every reference form: one (``combined``, ``readonly``), list (``mirrored``,
with URL elements), map (``sharded``), among memory leaves. Peers measured in the same run:
a hand-built dependency-injector DynamicContainer of the same shape (``providers.List`` and
``providers.Dict`` for the lists and maps, no validation), and a plain dict lookup for the call.
Targets: validate + build < 0.5 s; a resolved call within 10% of a raw ThreadSafeSingleton call.

    python benches/container_bench.py [--instances N]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
import timeit
from typing import Any

from dependency_injector import containers, providers

from castore_di import load_container, load_graph
from castore_di.composition import build_container
from castore_di.composition.loader import read_config


def make_config(n: int) -> dict[str, Any]:
    """n blob instances: memory leaves, and every reference form over earlier instances."""
    blobs: dict[str, Any] = {}
    for i in range(n):
        kind = i % 8 if i >= 4 else 1
        if kind == 0:
            blobs[f"s{i}"] = {"type": "combined", "local": f"s{i - 1}", "remote": f"s{i - 2}"}
        elif kind == 2:
            blobs[f"s{i}"] = {"type": "mirrored", "members": [f"s{i - 1}", f"s{i - 3}", "memory://"]}
        elif kind == 4:
            blobs[f"s{i}"] = {"type": "sharded", "shards": {"a": f"s{i - 1}", "b": f"s{i - 2}", "c": f"s{i - 4}"}}
        elif kind == 6:
            blobs[f"s{i}"] = {"type": "readonly", "backend": f"s{i - 1}"}
        else:
            blobs[f"s{i}"] = {"type": "memory"}
    blobs["default"] = {"type": "mirrored", "members": [f"s{n - 2}", f"s{n - 3}"]}
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

    def ref(value: str) -> Any:
        return providers.ThreadSafeSingleton(dict) if "://" in value else getattr(c, value)

    for name, spec in config["blobservices"].items():
        tag = spec["type"]
        if tag == "memory":
            p = providers.ThreadSafeSingleton(dict)
        elif tag == "combined":
            p = providers.ThreadSafeSingleton(dict, a=ref(spec["local"]), b=ref(spec["remote"]))
        elif tag == "mirrored":
            p = providers.ThreadSafeSingleton(dict, members=providers.List(*map(ref, spec["members"])))
        elif tag == "sharded":
            p = providers.ThreadSafeSingleton(dict, shards=providers.Dict({k: ref(v) for k, v in spec["shards"].items()}))
        else:
            p = providers.ThreadSafeSingleton(dict, backend=ref(spec["backend"]))
        setattr(c, name, p)
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
    forms = Counter(spec["type"] for spec in config["blobservices"].values())
    print(f"container of {len(graph.instances)} instances ({len(config['blobservices'])} named: "
          + ", ".join(f"{v} {k}" for k, v in sorted(forms.items())) + ")")
    print(f"{'measure':<48} {'value':>10} {'unit':<4} {'ratio':>7}")
    for name, value, unit, ratio in rows:
        print(f"{name:<48} {value:>10.2f} {unit:<4} {'' if ratio is None else f'{ratio:.2f}x':>7}")
    print("(ratios: build rows vs the raw DI build; call rows vs a dict lookup)")
    print(f"resolved call / raw DI singleton call: {call / raw_call:.2f}x; "
          f"validate + build: {t_total:.3f} s")


if __name__ == "__main__":
    main()
