"""benchmarks/bench_train.py's MFU counts the FLOPs that run: decoder matmuls and attention per token, the LM head
only at decision points, the embedding (a lookup) never."""

from bench_modules import load_suite

from icrl_fast.model.qnet import ModelConfig, QNetwork


def test_model_flops_count_what_runs():
    bench = load_suite("bench_train.py")
    d, inter, layers, vocab, length = 16, 32, 2, 50, 64
    q = QNetwork(ModelConfig(hidden_size=d, layers=layers, heads=2, intermediate_size=inter), vocab, [1, 2, 3, 4])
    linears = layers * (4 * d * d + 3 * d * inter)  # q, k, v, o and gate, up, down
    per_pass = 2 * linears + 2 * layers * length * d
    head = 0.05 * 2 * d * (vocab + 2 * 4)  # one decision in 20 tokens: full-vocab argmax + q and target readouts
    got = bench.model_flops_per_token(q, length, 0.05)
    assert abs(got - (4 * per_pass + head)) < 1e-6 * got  # from scratch: fwd, bwd (activations, weights), target
    every_param = sum(p.numel() for p in q.model.parameters())  # what the old count took as matmul weights
    assert every_param == linears + 2 * vocab * d + (2 * layers + 1) * d  # + embedding, LM head and norms
    assert got < 4 * (2 * every_param + 2 * layers * length * d)
