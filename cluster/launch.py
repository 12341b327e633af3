"""Launching the roles on Ray: resources and names come from the run config, not from the classes."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import ray

from actors.generation import GenerationWorker
from actors.reference import ReferenceModel
from actors.watchdog import Watchdog
from actors.worker_pool import WorkerPool, worker_name
from core.errors import CannotPlace
from learner.learner import LearnerSetup, PPOLearner
from learner.learner_group import LearnerGroup
from reward_server.server import start_reward_server

log = logging.getLogger(__name__)

# Environment every role's process gets: the in-process vLLM engine (see actors/generation.py),
# W&B / HF kept off the network, which these machines cannot reach, and the roles at the scheduling
# priority of Ray's own processes. Ray lowers its workers' (nice 15), so on a machine the roles fill, each
# wake-up of the raylet, GCS, dashboard or driver preempted a learner thread, and the other thread waited
# for it at the next barrier: a step of the default job took 14% (float32) to 28% (bf16) longer on 2 cores
# (`ray job submit` runs its driver at 0 for the same reason).
ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"), "RAY_worker_niceness": "0"}


# Custom Ray resources the roles ask for with `train.role_resources` (one unit per actor or replica);
# cluster/deploy/*.yaml declares them on the node types meant for each role.
ROLE_RESOURCES = ("generation", "learner", "reference", "reward")


def role_resources(cfg, role: str) -> dict:
    return {role: 1} if cfg.train.role_resources else {}


@dataclass
class Roles:
    pool: WorkerPool  # the generation workers
    reference: object  # the reference model's actor handle; with LoRA, the learner group
    learner: LearnerGroup  # the PPO learner's ranks
    reward: object  # reward server deployment handle


def start_ray(train_cfg) -> None:
    """Join the cluster at `train.ray_address` (or RAY_ADDRESS, as under `ray job submit`), else start a
    local one with `train.ray_num_cpus` logical CPUs."""
    if ray.is_initialized():
        return
    os.environ.update({k: v for k, v in ACTOR_ENV.items() if k not in os.environ})
    address = train_cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=train_cfg.ray_namespace, runtime_env={"env_vars": ACTOR_ENV})
    else:
        # Logical CPUs above the physical count: the roles take turns (generate, score, update) far more
        # than they run at once, and the learner and engines set their own thread counts.
        ray.init(num_cpus=int(train_cfg.ray_num_cpus), include_dashboard=train_cfg.dashboard,
                 namespace=train_cfg.ray_namespace, runtime_env={"env_vars": ACTOR_ENV})
    log.info("Ray cluster: %s", ray.cluster_resources())


def launch_roles(cfg, model_path: str, watchdog: Watchdog, ptx: list | None = None) -> Roles:
    """Every role of a PPO job; `ptx`: the learner's PPO-ptx demonstrations, encoded."""
    gen, ref, ppo = cfg.generation, cfg.reference, cfg.ppo
    _check_role_resources(cfg)
    pool = launch_pool(cfg, model_path, watchdog)
    learner = launch_learners(cfg, model_path, ptx)
    if cfg.reference_in_learner:  # LoRA's base with adapters off, or a frozen copy, in the learner's process
        reference = learner
    else:
        # The reference model never changes, so a restarted one is the same model: Ray runs the calls that
        # its dead process lost again (max_task_retries), and the job only waits for the restart.
        reference = ray.remote(ReferenceModel).options(
            name="reference", num_cpus=ref.num_cpus, num_gpus=ref.num_gpus,
            resources=role_resources(cfg, "reference"), max_restarts=ref.max_restarts,
            max_task_retries=ref.max_restarts,
        ).remote(model_path, ref, dtype=ppo.dtype, autocast=ppo.autocast, temperature=gen.temperature)
    reward = start_reward_server(cfg.reward, resources=role_resources(cfg, "reward"))
    # Surface a role that failed to start now, with its own error, rather than at the first call.
    ray.get([learner.get_version(), reference.ref_logprobs.remote([], [])])
    if ppo.weight_transfer == "nccl":
        ray.get(learner.open_weight_transfer(list(pool.workers.values())))
    return Roles(pool=pool, reference=reference, learner=learner, reward=reward)


def _check_role_resources(cfg) -> None:
    """With `train.role_resources`, refuse a role whose resource no node offers (Ray would wait for it
    forever), naming it."""
    if not cfg.train.role_resources:
        return
    roles = [r for r in ROLE_RESOURCES if r != "reference" or not cfg.reference_in_learner]
    missing = [r for r in roles if ray.cluster_resources().get(r, 0) < 1]
    if missing:
        raise CannotPlace(f"train.role_resources = true, but no node offers the resource{'s' * (len(missing) > 1)} "
                           f"{', '.join(missing)}: declare {'them' if len(missing) > 1 else 'it'} on the nodes meant "
                           f"for those roles (e.g. ray start --resources '{{\"{missing[0]}\": 1}}'; cluster/deploy/ "
                           f"has each node type), or run without train.role_resources")


# How long the learner ranks' placement group may take to be placed once the cluster has the resources.
PLACEMENT_TIMEOUT_S = 120.0


def launch_learners(cfg, model_path: str, ptx: list | None = None) -> LearnerGroup:
    """`ppo.num_learners` learner ranks, named `learner` (rank 0) and `learner-<rank>`, in one placement group
    (one bundle per rank, packed or spread as `ppo.placement` says), joined in one process group. A group
    that the cluster cannot hold fails here, saying what is missing."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ppo, gen = cfg.ppo, cfg.generation
    bundle = {k: v for k, v in {"CPU": ppo.num_cpus, "GPU": ppo.num_gpus, **role_resources(cfg, "learner")}.items()
              if v > 0} or {"CPU": 0.01}
    _check_cluster_holds(bundle, ppo.num_learners)
    group = placement_group([bundle] * ppo.num_learners, strategy=ppo.placement.upper())
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise CannotPlace(f"the {ppo.num_learners} learner ranks ({bundle} each, {ppo.placement}) were not placed "
                           f"within {PLACEMENT_TIMEOUT_S:.0f} s: other roles hold the resources they need (free now: "
                           f"{ray.available_resources()}); lower ppo.num_learners or ppo.num_cpus/num_gpus") from None
    in_bundle = [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
                 for i in range(ppo.num_learners)]
    rendezvous = ray.get(_free_address.options(scheduling_strategy=in_bundle[0]).remote())
    ranks = [ray.remote(PPOLearner).options(
        name="learner" if i == 0 else f"learner-{i}", num_cpus=ppo.num_cpus, num_gpus=ppo.num_gpus,
        resources=role_resources(cfg, "learner"), scheduling_strategy=in_bundle[i],
    ).remote(model_path, ppo, LearnerSetup(temperature=gen.temperature, max_new_tokens=gen.max_new_tokens,
                                           inference_dtype=gen.dtype, reference=cfg.reference_in_learner, rank=i,
                                           world_size=ppo.num_learners, rendezvous=rendezvous), ptx)
        for i in range(ppo.num_learners)]
    return LearnerGroup(ranks, group)


def _check_cluster_holds(bundle: dict, count: int) -> None:
    """Refuse a learner group larger than the whole cluster (Ray would wait for it forever)."""
    total = ray.cluster_resources()
    short = {k: f"{count} x {v:g} = {count * v:g} needed, the cluster has {total.get(k, 0):g}"
             for k, v in bundle.items() if count * v > total.get(k, 0) + 1e-9}
    if short:
        raise CannotPlace(f"ppo.num_learners = {count} learner ranks cannot be placed: "
                           + "; ".join(f"{k}: {why}" for k, why in short.items())
                           + ". Lower ppo.num_learners or ppo.num_cpus/num_gpus, or add nodes")


@ray.remote(num_cpus=0)
def _free_address() -> str:
    """tcp://<this node's IP>:<a free port>: where learner rank 0, placed on this node, meets the others."""
    from learner.distributed import free_port

    return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"


def launch_pool(cfg, model_path: str, watchdog: Watchdog | None = None) -> WorkerPool:
    """`generation.num_workers` workers of the policy at `model_path`, up and answering, with autoscaling
    bounds from the config."""
    gen = cfg.generation
    workers = [launch_worker(cfg, model_path, i) for i in range(gen.num_workers)]
    ray.get([w.stats.remote() for w in workers])
    bounds = (gen.autoscale_min_workers, gen.autoscale_max_workers) if gen.autoscale_max_workers else None
    demand = {k: v for k, v in {"CPU": gen.num_cpus, "GPU": gen.num_gpus, **role_resources(cfg, "generation")}.items()
              if v > 0}
    return WorkerPool(workers, spawn=lambda i: launch_worker(cfg, model_path, i), watchdog=watchdog,
                      autoscale_bounds=bounds, fixed=cfg.ppo.weight_transfer == "nccl", demand=demand)


def launch_worker(cfg, model_path: str, index: int, wait_s: float = 30.0):
    """Generation worker `index`, named `generation-worker-<index>` in the dashboard. Ray restarts its
    process up to `generation.max_restarts` times; calls in flight then fail (no task retries), and
    the rollout stream re-issues their prompts."""
    gen = cfg.generation
    name = worker_name(index)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.remote(GenerationWorker).options(
                name=name, num_cpus=gen.num_cpus, num_gpus=gen.num_gpus, max_restarts=gen.max_restarts,
                max_task_retries=0, resources=role_resources(cfg, "generation"),
            ).remote(name, model_path, gen, seed=gen.seed + index, lora_rank=cfg.ppo.lora_rank,
                      weight_transfer=cfg.ppo.weight_transfer)
        except ValueError:  # the name of a worker just killed is released a moment later
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def roles_by_node(roles: Roles, timeout_s: float = 30.0) -> dict[str, list[str]]:
    """Which roles run on which Ray node: node id -> role names (a role that does not answer within
    `timeout_s`, e.g. one whose node was just lost, is left out)."""
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    asks = {worker_name(i): lambda w=w: w.stats.remote() for i, w in roles.pool.workers.items()}
    asks.update({"learner" if i == 0 else f"learner-{i}": rank.node_id.remote
                 for i, rank in enumerate(roles.learner.ranks)})
    if roles.reference is not roles.learner:
        asks["reference"] = roles.reference.node_id.remote
    placed: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout_s
    for role, ask in asks.items():
        while True:
            try:
                answer = ray.get(ask(), timeout=max(deadline - time.monotonic(), 0.1))
                break
            except ActorUnavailableError:  # restarting, or its connection not yet re-established: ask again
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                answer = None
            except (RayActorError, GetTimeoutError) as exc:
                log.warning("%s did not say where it runs (%s)", role, type(exc).__name__)
                answer = None
            break
        if answer is not None:
            placed.setdefault(answer["node_id"] if isinstance(answer, dict) else answer, []).append(role)
    try:
        placed.setdefault(roles.reward.node_id.remote().result(timeout_s=max(deadline - time.monotonic(), 0.1)),
                          []).append("reward")
    except Exception as exc:  # noqa: BLE001 - Serve raises its own kinds while a replica is being replaced
        log.warning("the reward replica did not say where it runs (%s)", type(exc).__name__)
    return placed


def describe_nodes(placed: dict[str, list[str]]) -> str:
    """`roles_by_node` as one line per node: its address, id and roles."""
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return "\n".join(f"  {address.get(node, '?')} ({node[:8]}): {', '.join(sorted(names))}"
                     for node, names in placed.items())


def shutdown_roles(roles: Roles) -> None:
    """Stop every role this job launched (a driver that exits stops them too; tests reuse one cluster)."""
    from ray import serve

    roles.pool.shutdown()
    if roles.reference is not roles.learner:
        ray.kill(roles.reference, no_restart=True)
    roles.learner.kill()
    serve.shutdown()
