"""Malicious clients: who they are and what they do, in the same compiled round.

    attack = fs.attacks.Attack(fraction=0.2, data=fs.attacks.label_flip())
    attack = fs.attacks.Attack(fraction=0.2, update=fs.attacks.little_is_enough())
    attack = fs.attacks.Attack(clients=[3], data=fs.attacks.backdoor(target=0),
                               update=fs.attacks.model_replacement())
    fs.simulate(..., attack=attack, aggregator=fs.aggregators.trimmed_mean(0.2))

An `Attack` names the malicious clients (a `fraction` of the population drawn with its own
`seed`, or a fixed set of `clients`) and what they do: to their training data (`data`:
label flipping, a pixel backdoor; applied once before training) and to the update they
send (`update`: sign flipping, scaling, Gaussian noise, model replacement, "a little is
enough", inner-product manipulation; applied inside the compiled round). The malicious
clients are sampled like any other: a round's cohort holds those the sampler draws. Every
round logs `malicious_clients`, how many of its cohort are malicious; a backdoor also
reports `backdoor_success` whenever the run evaluates on `eval_data`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fedjax_sim.attacks.data import DATA_ATTACKS, DataPoisoning, backdoor, label_flip
from fedjax_sim.attacks.updates import (UPDATE_ATTACKS, gaussian_noise, inner_product,
                                        little_is_enough, model_replacement, scale, sign_flip)
from fedjax_sim.engine.contracts import UpdateAttack
from fedjax_sim.errors import UserError


@dataclasses.dataclass(frozen=True)
class Attack:
    """Which clients are malicious and what they do.

    fraction: the share of the training clients that are malicious (rounded to the
      nearest count), drawn uniformly with `seed`; or
    clients: the malicious clients, as positions in the training data (ints) or client ids
      (strings).
    data: what they do to their training data (`label_flip`, `backdoor`), or None.
    update: what they do to the update they send (`sign_flip`, `scale`, `gaussian_noise`,
      `model_replacement`, `little_is_enough`, `inner_product`), or None.
    seed: draws the malicious clients (with `fraction`) and the poisoned examples; it is
      the attack's own, so runs of several seeds face the same attackers.
    """

    fraction: float | None = None
    clients: Sequence[int | str] | None = None
    data: DataPoisoning | None = None
    update: UpdateAttack | None = None
    seed: int = 0

    def __post_init__(self):
        if (self.fraction is None) == (self.clients is None):
            raise UserError("an Attack needs either fraction=<share of clients that are "
                            "malicious> or clients=[...], not both or neither")
        if self.fraction is not None and (
                isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
                or not 0 <= self.fraction <= 1):
            raise UserError(f"attack fraction must be a number in [0, 1], got {self.fraction!r}")
        if self.data is None and self.update is None:
            raise UserError("an Attack needs data=... (e.g. fs.attacks.label_flip()) or update=... "
                            "(e.g. fs.attacks.sign_flip()): what the malicious clients do")
        if self.data is not None and not isinstance(self.data, DataPoisoning):
            raise UserError(f"attack data must be a data attack such as fs.attacks.label_flip(), "
                            f"got {self.data!r}")
        if self.update is not None and not isinstance(self.update, UpdateAttack):
            raise UserError(f"attack update must be an update attack such as "
                            f"fs.attacks.sign_flip(), got {self.update!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise UserError(f"attack seed must be an integer, got {self.seed!r}")

    def malicious(self, client_ids: Sequence[str]) -> np.ndarray:
        """[C] bool: which of the training data's clients (given by their ids) are malicious."""
        num = len(client_ids)
        mask = np.zeros(num, bool)
        if self.fraction is not None:
            count = int(round(self.fraction * num))
            mask[np.random.default_rng([self.seed, 0xA77]).choice(num, count, replace=False)] = True
            return mask
        index = {c: i for i, c in enumerate(client_ids)}
        for c in self.clients:
            if isinstance(c, str):
                if c not in index:
                    raise UserError(f"attack client {c!r} is not a client of the training data "
                                    f"(ids such as {list(client_ids[:3])})")
                mask[index[c]] = True
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < num:
                mask[int(c)] = True
            else:
                raise UserError(f"attack clients must be client positions in [0, {num}) or client "
                                f"ids, got {c!r}")
        return mask

    def poison(self, train_data, malicious: np.ndarray):
        """The training data with the malicious clients' examples poisoned (`data`), or
        the data itself when the attack leaves data alone."""
        if self.data is None or not malicious.any():
            return train_data
        from fedjax_sim.data import FederatedData

        offsets = np.asarray(train_data.offsets)
        clients = [(int(offsets[i]), int(offsets[i + 1])) for i in np.flatnonzero(malicious)]
        features = self.data.poison(dict(train_data.features), clients,
                                    np.random.default_rng([self.seed, 0xDA7A]))
        return FederatedData(features, train_data.offsets, train_data.client_ids)

    def describe(self) -> dict:
        """What the run records of the attack (its summary and run description)."""
        return {"fraction": self.fraction, "clients": None if self.clients is None else
                [c if isinstance(c, str) else int(c) for c in self.clients],
                "data": None if self.data is None else self.data.name,
                "update": None if self.update is None else repr(self.update.key),
                "seed": int(self.seed)}


__all__ = ["Attack", "DataPoisoning", "UpdateAttack", "label_flip", "backdoor", "sign_flip",
           "scale", "gaussian_noise", "model_replacement", "little_is_enough", "inner_product",
           "DATA_ATTACKS", "UPDATE_ATTACKS"]
