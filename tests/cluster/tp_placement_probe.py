"""Run as a Ray job on tests/cluster/test_multinode.py's role-labelled cluster (nodes of 2, 1
and 2 CPUs for generator, judge and trainer): one tensor-parallel actor (TP=2, one CPU per
rank: CPUs stand in for GPUs) through `actors.factory.ActorFactory` on the generator nodes and
one on the judge nodes, plus `cluster.placement.check_resources` for the same pools. Prints one
JSON line: for each role, whether the actor's placement group was placed and on which nodes'
roles, and the resource check's problems.
"""

import json
import sys
from pathlib import Path

import ray

# This checkout's packages, whatever the interpreter has installed (run as a script, its own
# folder comes first on the path, not the working directory).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from actors.factory import ActorFactory
from cluster.placement import check_resources
from sppo.config import PoolConfig, load_config
from sppo.driver import DEMO_CONFIG


class Probe:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def main() -> None:
    ray.init()
    role_of = {n["NodeID"]: (n.get("Labels") or {}).get("role") for n in ray.nodes()}
    pool = PoolConfig(replicas=1, num_cpus=1, num_gpus=0, tensor_parallel_size=2)
    out = {}
    for role in ("generator", "judge"):
        factory = ActorFactory(Probe, pool, (), label_selector=lambda r=role: {"role": r},
                               tensor_parallel=True)
        factory()
        (pg,) = factory.placement_groups
        ready, _ = ray.wait([pg.ready()], timeout=20)
        table = ray.util.placement_group_table(pg)
        out[role] = {"placed": bool(ready),
                     "bundle_roles": sorted(str(role_of.get(n)) for n in
                                            table["bundles_to_node_id"].values() if n)}
        factory.release()
    cfg = load_config(DEMO_CONFIG, ["pools.generator.tensor_parallel_size=2",
                                    "pools.generator.num_cpus=1",
                                    "pools.judge.tensor_parallel_size=2",
                                    "pools.judge.num_cpus=1", "judge.backend=llm",
                                    "judge.model_path=builtin:tiny-llama", "judge.kv_cache_gb=0.1"])
    out["problems"] = check_resources(cfg, ray.cluster_resources(), ray.nodes())
    print("TP_PROBE " + json.dumps(out))


if __name__ == "__main__":
    main()
