"""How `brainmri tune --search tpe` chooses trials: Optuna's TPE through Ray Tune's OptunaSearch.

`--search random` (ops/tune.py) samples every trial up front and runs them as a grid. TPE
instead proposes each next trial from the scores of those already run, so it needs the space
file as something Optuna can ask questions of: `OptunaSpace`, a define-by-run function over
the same space file (same domains, same conditional families) that hands each trial its flat
parameters and its id. ASHA stays the scheduler; Tune saves the searcher (this space and the
Optuna study) with the experiment, so `--resume` continues the same search.
"""

from __future__ import annotations

PRIMITIVE = (str, int, float, bool, type(None))  # what Optuna's categorical choices may hold


def families(dom) -> dict:
    """A space file's `model` entry as {family: its own parameters} (a name or a list of names
    allowed). Shared by both searchers: random sampling (ops/tune.py) and TPE."""
    if isinstance(dom, str):
        return {dom: {}}
    if isinstance(dom, list):
        return {name: {} for name in dom}
    return dom


def suggest(trial, name: str, dom):
    """One value of a space-file domain, asked of an Optuna trial under `name`."""
    if isinstance(dom, dict):
        (kind, arg), = dom.items()
        if kind == "choice":
            dom = arg
        elif kind == "uniform":
            return trial.suggest_float(name, arg[0], arg[1])
        elif kind == "loguniform":
            return trial.suggest_float(name, arg[0], arg[1], log=True)
        else:  # randint: [low, high), as random search draws it
            return trial.suggest_int(name, int(arg[0]), int(arg[1]) - 1)
    if not isinstance(dom, list):
        return dom  # a constant: nothing to ask
    if all(isinstance(v, PRIMITIVE) for v in dom) and len(set(map(repr, dom))) == len(dom):
        return trial.suggest_categorical(name, dom)
    # lists (a depth like [1, 2, 2, 1]) or repeated values: Optuna chooses among positions
    return dom[trial.suggest_categorical(f"{name}#", list(range(len(dom))))]


class OptunaSpace:
    """The space file as an Optuna define-by-run function.

    Returns {"trial": id, "params": flat parameters as `sample_trials` gives them}. A family's
    own parameters are asked for only when that family is chosen, under "<family>:<key>", so
    two families may give one key different domains without confusing the sampler. An object,
    not a closure: Tune pickles the searcher, this included, into the experiment."""

    def __init__(self, space: dict, default_model: str):
        self.space, self.default_model = space, default_model

    def __call__(self, trial) -> dict:
        params: dict = {}
        for key in sorted(k for k in self.space if k != "model"):
            params[key] = suggest(trial, key, self.space[key])
        model = self.default_model
        if "model" in self.space:
            fams = families(self.space["model"])
            model = trial.suggest_categorical("model", sorted(fams))
            for key in sorted(fams[model] or {}):  # a family's own win over shared ones
                params[key] = suggest(trial, f"{model}:{key}", fams[model][key])
            params = {"model": model, **params}
        return {"trial": f"t{trial.number:03d}-{model}", "params": params}


def startup_trials(num_samples: int) -> int:
    """Random trials TPE runs before it models the scores. Optuna's default (10) is more than a
    whole laptop search (8 trials); a third of the budget, at least 2, keeps TPE doing something."""
    return max(2, min(10, num_samples // 3))


def first_points(space: dict, num_samples: int) -> list[dict]:
    """The trials TPE is told to run first: one per model family (its other parameters drawn
    at random), while the budget allows. Without them a seeded search can spend its few random
    start-up trials on one family: on the CPU space at 3 epochs both of seed 0's start-up
    trials drew mobilenet_v3_small, which does not learn at that length (every trial's
    macro-F1 0.10), and TPE, given only ties, never proposed brainnet in 8 trials."""
    fams = sorted(families(space["model"])) if "model" in space else []
    return [{"model": f} for f in fams] if 1 < len(fams) <= num_samples else []


def tpe_searcher(space: dict, default_model: str, num_samples: int, seed: int):
    """Ray Tune's OptunaSearch with a seeded TPE sampler over the space file, maximising the
    selection metric (given here: a searcher built with its own space never receives the
    Tuner's). Every family is tried first (first_points), then at least one more random
    trial, before TPE models the scores. constant_liar: trials running at once get pessimistic
    stand-in scores, so concurrent proposals spread out."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from ..core.metrics import SELECTION_METRIC

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = first_points(space, num_samples)
    sampler = optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=max(startup_trials(num_samples), len(first) + 1), constant_liar=True)
    return OptunaSearch(space=OptunaSpace(space, default_model), sampler=sampler,
                        metric=SELECTION_METRIC, mode="max", points_to_evaluate=first or None)
