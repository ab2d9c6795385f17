"""FedSGD regression with homomorphically encrypted aggregation (CKKS, TenSEAL) on
scikit-learn's diabetes data (configs/diabetes_fedsgd.py otherwise).

    pip install 'fedjax_sim[he]'
    fedjax-sim train --config configs/diabetes_fedsgd_he.py --workdir runs/diabetes_he

Every client encrypts its weighted gradient and its weight with the clients' shared
CKKS key; the server adds the ciphertexts with a public context (no secret key) and only
the sum is decrypted. It runs on the host, one client after another, so it suits small
models like this MLP (131 parameters). The final parameters equal the plaintext run's to
within CKKS precision (benchmarks/encrypted.py reports the largest difference and the
cost per client); the metrics log the encryption, summing and decryption milliseconds
and the ciphertext bytes.

353 training patients split IID across 10 clients; every round all 10 send one
full-batch gradient (local_epochs=1, batch_size=None, client SGD lr 1) and the server takes
an SGD step of lr 0.1 with momentum 0.9. Targets are standardised with the training
mean/std (summary.json records them), so a constant predictor has test MSE ~1.
Reaches test MSE 0.545 after 300 rounds (seed 0), in about 20 s on a 2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 300
    c.clients_per_round = 10
    c.eval_every = 50
    c.task = "regression"
    c.data = dict(source="diabetes", num_clients=10, partition="iid", partition_args={},
                  client_test_fraction=0.0, seed=0)
    c.model = dict(name="mlp", num_outputs=None, args=dict(hidden=[10], dense_impl="auto"))
    c.algorithm = dict(
        name="fedavg",
        client_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        server_optimizer=dict(name="sgd", learning_rate=0.1, args=dict(momentum=0.9)),
        local_epochs=1, local_steps=None, batch_size=None, weighting="num_examples")
    c.aggregator = dict(encrypted=dict(scheme="ckks", poly_modulus_degree=8192))
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto")
    # Saved to <workdir>/checkpoints; re-running the command on that workdir resumes.
    c.checkpoint = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
