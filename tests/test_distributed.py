"""Two CPU processes on gloo under torchrun: DDP training, all-reduced stats, --dist-eval = single-process eval,
resume of the group."""
import json
import re

import torch

from train_helpers import fast_flags, make_shapes_folder, run_spach, torchrun, torchrun_nodes


def _eval_line(text):
    return re.findall(r"^\* Acc@1 [0-9.]+ Acc@5 [0-9.]+ loss [0-9.]+$", text, re.M)


def test_ddp_training_dist_eval_and_resume(tmp_path):
    # 45 val images: not divisible by 2, so a padding sampler would count one image twice
    data = make_shapes_folder(tmp_path / "shapes", n_train=32, n_val=15)
    out = tmp_path / "ddp"
    # --log-interval 3 next to --print-freq 5: both ranks must sync at the same steps, though only rank 0 logs
    r = torchrun("train", *fast_flags(data, out, "--dist-eval", "--repeated-aug", "--tensorboard", "--log-interval",
                                      "3", epochs=2, batch=8))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world_size: 2" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert len(list((out / "tensorboard").glob("events.*"))) == 1  # rank 0 alone writes
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("step/loss")] == [3, 6, 9, 12]  # 6 steps an epoch over both ranks
    assert r.stdout.count("Averaged stats:") == 2  # printed once (rank 0), with all-reduced values
    assert "Accuracy of the network on the 45 test images" in r.stdout
    ddp_eval = _eval_line(r.stdout)[-1]
    log = [json.loads(l) for l in (out / "log.txt").read_text().splitlines()]
    assert [l["epoch"] for l in log] == [0, 1]

    ckpt = out / "checkpoint.pth"
    single = run_spach("eval", "--checkpoint", ckpt, "--data-path", data, "--device", "cpu", "--num_workers", "0")
    assert single.returncode == 0, single.stderr
    assert _eval_line(single.stdout) == [ddp_eval]  # same acc@1, acc@5 and loss, to the printed digit

    dist = torchrun("eval", "--checkpoint", ckpt, "--data-path", data, "--device", "cpu", "--num_workers", "0",
                    "--dist-eval", "--batch-size", "4")
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert _eval_line(dist.stdout) == [ddp_eval]
    assert "Accuracy of the network on the 45 test images" in dist.stdout

    # a rerun with more epochs resumes the group, each rank from its own RNG state
    ck = torch.load(ckpt, weights_only=True)
    assert len(ck["rng_per_rank"]) == 2 and ck["world_size"] == 2
    assert not torch.equal(ck["rng_per_rank"][0]["torch"], ck["rng_per_rank"][1]["torch"])
    r = torchrun("train", *fast_flags(data, out, "--dist-eval", "--repeated-aug", epochs=3, batch=8))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "auto resume from" in r.stdout and "Epoch: [2]" in r.stdout and "Epoch: [1]" not in r.stdout
    assert [json.loads(l)["epoch"] for l in (out / "log.txt").read_text().splitlines()] == [0, 1, 2]


def test_ddp_trains_and_resumes_smlpnet(tmp_path):
    """The new families go through the same DDP path: sMLPNet (BatchNorm in every block, a fixed-size token MLP)
    on two ranks, --dist-eval equal to one process, and the group resumed."""
    data = make_shapes_folder(tmp_path / "shapes", n_train=32, n_val=15)
    out = tmp_path / "ddp"
    flags = ["--model", "smlpnet_tiny", "--dist-eval"]
    r = torchrun("train", *fast_flags(data, out, *flags, epochs=1, batch=8))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world_size: 2" in r.stdout and "Accuracy of the network on the 45 test images" in r.stdout
    ckpt = out / "checkpoint.pth"
    assert torch.load(ckpt, weights_only=True)["args"]["model"] == "smlpnet_tiny"
    single = run_spach("eval", "--checkpoint", ckpt, "--data-path", data, "--device", "cpu", "--num_workers", "0")
    assert single.returncode == 0, single.stderr
    assert _eval_line(single.stdout) == [_eval_line(r.stdout)[-1]]
    r = torchrun("train", *fast_flags(data, out, *flags, epochs=2, batch=8))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "auto resume from" in r.stdout and "Epoch: [1]" in r.stdout and "Epoch: [0]" not in r.stdout


def _model_tensors(out):
    return torch.load(out / "checkpoint.pth", weights_only=True)["model"]


def test_two_agents_train_as_one_agent_with_two_processes(tmp_path):
    """The multi-node rehearsal on one host: two torchrun agents (--nnodes 2, one process each, node 0 and 1)
    train the same weights, bit for bit, as one agent with two processes: same world size, same ranks, same data
    order. Static rendezvous (--master_addr/--master_port): node R runs rank R. c10d: ranks in the agents' joining
    order (node_rank is ignored), which moves rank 0, but not the result. Both agents write one --output_dir on
    one host: only rank 0 takes its lock and writes."""
    data = make_shapes_folder(tmp_path / "shapes", n_train=32, n_val=15)

    def flags(out):
        return ["train", *fast_flags(data, out, "--deterministic", epochs=2, batch=8)]

    one = torchrun(*flags(tmp_path / "one"), nproc=2)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    reference = _model_tensors(tmp_path / "one")

    n0, n1 = torchrun_nodes(*flags(tmp_path / "static"))
    assert n0.returncode == 0 and n1.returncode == 0, n0.stderr[-3000:] + n1.stderr[-3000:]
    assert "world_size: 2" in n0.stdout and n0.stdout.count("Averaged stats:") == 2
    assert n1.stdout == ""  # rank 1 logs nothing
    log = [json.loads(l) for l in (tmp_path / "static" / "log.txt").read_text().splitlines()]
    assert [l["epoch"] for l in log] == [0, 1]
    assert not (tmp_path / "static" / ".spach.lock").exists()  # released by its one owner
    static = _model_tensors(tmp_path / "static")
    assert static.keys() == reference.keys()
    assert all(torch.equal(static[k], reference[k]) for k in reference)
    ck = torch.load(tmp_path / "static" / "checkpoint.pth", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2

    nodes = torchrun_nodes(*flags(tmp_path / "c10d"), rendezvous="c10d")
    assert [n.returncode for n in nodes] == [0, 0], "".join(n.stderr[-3000:] for n in nodes)
    assert sum("world_size: 2" in n.stdout for n in nodes) == 1  # one of them ran rank 0
    c10d = _model_tensors(tmp_path / "c10d")
    assert all(torch.equal(c10d[k], reference[k]) for k in reference)

    # a worker of node 1 is SIGKILLed in step 4 of epoch 1 (a lost process, no signal to answer); torchrun
    # --max-restarts 1 restarts both agents' workers, which resume from the newest state, recovery.pth of step 2
    # (--recovery-interval 2), and end with the same weights, bit for bit
    out = tmp_path / "restarted"
    nodes = torchrun_nodes(*flags(out), "--recovery-interval", "2", torchrun_flags=["--max-restarts", "1"],
                           node_env={1: {"SPACH_FAULT_AT": "step:1:3", "SPACH_FAULT_RANK": "1"}})
    assert [n.returncode for n in nodes] == [0, 0], "".join(n.stderr[-3000:] for n in nodes)
    text = nodes[0].stdout + nodes[0].stderr
    assert f"auto resume from {out / 'recovery.pth'}" in text
    assert "in epoch 1 after step 2 (32 samples of the epoch done)" in text
    restarted = _model_tensors(out)
    assert all(torch.equal(restarted[k], reference[k]) for k in reference)
