"""FedAvg on Shakespeare next-character prediction from LEAF's JSON files.

    fedjax-sim train --config configs/shakespeare_leaf.py --workdir runs/shakespeare_leaf

LEAF's Shakespeare (Caldas et al. 2018): each client is one speaking role of a play; each
example is 80 characters and the next one. Every position is trained to predict the
character after it (the last position's target is LEAF's label) with the `sequence` task,
which masks padding and reports token accuracy. The model is the zoo's `char_lstm`
(embedding 8, two LSTM layers of 256: TFF's Shakespeare baseline). Clients hold from a
handful to tens of thousands of windows, so each takes a fixed 50 steps of 10 sequences
(epochs would pad every client to the largest one); 10 clients a round, client SGD at
1.0, server SGD at 1, 1,200 rounds.

Needs LEAF's preprocessed data: in LEAF's data/shakespeare, run e.g.
`./preprocess.sh -s niid --sf 0.2 -k 0 -t sample -tf 0.8` and point data.train_path /
data.test_path at data/train and data/test (see docs/data.md, "Public and natural
datasets").
The full set is about 4 million windows: with engine.device_data_budget set (e.g.
'1GiB'), what does not fit stays on the host and each round's clients are streamed.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 1200
    c.clients_per_round = 10
    c.eval_every = 50
    c.task = "sequence"
    c.data = dict(source="leaf", dataset="shakespeare", train_path="data/shakespeare/data/train",
                  test_path="data/shakespeare/data/test", seq_len=80, drop_empty=True,
                  heldout_clients=None, seed=0)
    c.model = dict(name="char_lstm", num_outputs=None,
                   args=dict(embed_dim=8, hidden=256, num_layers=2))
    c.algorithm = dict(
        name="fedavg",
        client_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        server_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        local_epochs=None, local_steps=50, batch_size=10, weighting="num_examples")
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto",
                    data_placement="auto", device_data_budget=None)
    c.checkpoint = dict(every_rounds=None, every_seconds=300.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
