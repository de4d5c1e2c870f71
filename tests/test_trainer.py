import logging
import re

import pytest
import torch

from blocklora.config import AdapterConfig, TrainConfig
from blocklora.method.artifact import ConceptArtifact
from blocklora.method.inject import find_targets
from blocklora.training.trainer import train_concept
from core_helpers import write_images

CFG = AdapterConfig(erasure=0.25)


def _train(base, images, steps, **kw):
    return train_concept(base, images, "pet", "dog", 4, CFG, TrainConfig(steps=steps, resolution=32, **kw),
                         progress=False, checkpoint_dir=kw.pop("ckpt", None))


def test_artifact_is_valid_and_base_is_left_untouched(tiny_base, tmp_path):
    w0 = {k: lin.weight.clone() for k, lin in find_targets(tiny_base.pipe, CFG).items()}
    art = _train(tiny_base, write_images(tmp_path / "img"), steps=3)
    back = ConceptArtifact.from_bytes(art.to_bytes())
    assert back.meta.slot == 4 and back.meta.triggers == ("<blk4>",) and back.meta.train_config["steps_done"] == 3
    assert any(v.abs().sum() > 0 for k, v in art.tensors.items() if k.endswith("lora_B"))  # B learned
    after = find_targets(tiny_base.pipe, CFG)
    assert all(torch.equal(lin.weight, w0[k]) for k, lin in after.items())
    assert type(tiny_base.pipe.text_encoder.get_input_embeddings()).__name__ == "Embedding"


def test_deterministic_with_a_seed(tmp_path):
    from blocklora.pipeline.base import load_base

    images = write_images(tmp_path / "img")
    a, b = (_train(load_base("tiny"), images, steps=3) for _ in range(2))
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_resume_equals_uninterrupted(tmp_path):
    from blocklora.pipeline.base import load_base
    from blocklora.training.data import load_concept_images
    from blocklora.training.trainer import ConceptTrainer

    images = write_images(tmp_path / "img")
    full = _train(load_base("tiny"), images, steps=4)
    # run 2 steps, checkpoint, throw the trainer away; a new process-like trainer resumes
    cfg = TrainConfig(steps=4, resolution=32, checkpoint_every=2)
    x, caps = load_concept_images(images, 32)
    t = ConceptTrainer(load_base("tiny"), CFG, cfg, 4, "pet", "dog")
    for _ in range(2):
        t.step(*t.sample_batch(x, caps))
    t.save_checkpoint(tmp_path / "ckpt")
    t.close()
    resumed = train_concept(load_base("tiny"), images, "pet", "dog", 4, CFG, cfg, checkpoint_dir=tmp_path / "ckpt",
                            progress=False)
    for k in full.tensors:
        torch.testing.assert_close(resumed.tensors[k], full.tensors[k], rtol=0, atol=1e-6)


def test_resume_with_the_quiet_penalty_equals_uninterrupted(tmp_path, caplog):
    """The quiet penalty's bank is recorded from the base with its own generator, so a run resumed
    from a checkpoint records the same bank and ends where the uninterrupted run does; the other
    classes' pictures too, which are drawn by the trainer, whose resumed rows are trained."""
    from blocklora.pipeline.base import load_base

    images = write_images(tmp_path / "img")
    quiet = dict(resolution=32, quiet_weight=1.0, quiet_classes=("cat",), num_class_images=2, checkpoint_every=2)
    full = train_concept(load_base("tiny"), images, "pet", "dog", 4, CFG, TrainConfig(steps=4, **quiet), progress=False)
    caplog.set_level(logging.INFO, logger="blocklora.training.trainer")
    for steps in (2, 4):  # stop after the checkpoint at step 2, then a fresh process resumes to 4
        resumed = train_concept(load_base("tiny"), images, "pet", "dog", 4, CFG, TrainConfig(steps=steps, **quiet),
                                checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert "resumed pet from step 2" in caplog.text
    for k in full.tensors:
        torch.testing.assert_close(resumed.tensors[k], full.tensors[k], rtol=0, atol=1e-6)


def test_prior_preservation_runs(tiny_base, tmp_path):
    art = _train(tiny_base, write_images(tmp_path / "img"), steps=2, prior_preservation=True, num_class_images=2)
    assert art.meta.train_config["prior_preservation"] is True


def test_quiet_penalty_keeps_the_residual_off_pictures_without_the_concept(tmp_path):
    """Same seed, pictures and steps: with the quiet penalty the trained rows act far less on the base's
    class-prompt pictures (what the other concepts' prompts are, once merged) than without it, measured
    on class pictures and noise draws the penalty never saw."""
    from blocklora.pipeline.base import load_base
    from blocklora.training.class_pictures import draw_class_images
    from blocklora.training.data import load_concept_images
    from blocklora.training.quiet import QuietBank
    from blocklora.training.trainer import ConceptTrainer, run_steps

    images, captions = load_concept_images(write_images(tmp_path / "img"), 32)
    energy = {}
    for weight in (0.0, 10.0):
        base = load_base("tiny")
        cls = draw_class_images(base, "dog", 2, seed=0, steps=2)
        trainer = ConceptTrainer(base, CFG, TrainConfig(steps=6, resolution=32, lr=1e-2, quiet_weight=weight), 4,
                                 "pet", "dog")
        run_steps(trainer, images, captions, cls, [])
        held_out = draw_class_images(base, "dog", 2, seed=1, steps=2)
        energy[weight] = float(QuietBank.record(trainer, [(held_out, "dog")], seed=7).energy(trainer).detach())
        trainer.close()
    assert 0 < energy[10.0] < 0.5 * energy[0.0], energy


def test_progress_lines_a_person_can_follow(tmp_path, capsys, monkeypatch):
    """The one step loop prints step k/N, the loss, steps/s and an ETA (first and last step at least),
    then the steady-state rate that benchmarks compare; before the first step, what it draws and why.
    Run again on the same node, it reads those pictures from the node's cache and trains the same bits."""
    from blocklora.pipeline.base import load_base

    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path / "node-cache"))  # this node's cache, empty
    train = TrainConfig(steps=3, resolution=32, prior_preservation=True, quiet_weight=0.1,
                        quiet_classes=("cat", "dog", "cup"), num_class_images=2)
    arts = [train_concept(load_base("tiny"), write_images(tmp_path / "img"), "pet", "dog", 4, CFG, train, progress=True)
            for _ in range(2)]
    out = capsys.readouterr().out
    first, again = out.split("[pet] trained to step 3")[:2]
    needed = (r"\[pet\] class pictures for prior preservation and the quiet penalty: "
              r"2 base pictures each of 3 classes \(dog, cat, cup\)\n")
    bank = r"\[pet\] quiet penalty's bank recorded over 3 classes in \d+\.\d s\n\[pet\] step 1/3 "
    drawing = "".join(rf"\[pet\] drawing 2 base pictures of 'a photo of {w}'\n" for w in ("dog", "cat", "cup"))
    ready = r"\[pet\] class pictures ready in \d+\.\d s: {} drawn here, {} read from this node's cache\n"
    assert re.search(r"\A" + needed + drawing + ready.format(3, 0) + bank, first), out
    assert re.search(needed + ready.format(0, 3) + bank, again), out
    assert arts[0].to_bytes() == arts[1].to_bytes()
    assert re.search(r"^\[pet\] step 1/3  loss \d+\.\d{4}  first step$", out, re.M), out
    assert re.search(r"^\[pet\] step 3/3  loss \d+\.\d{4}  \d+\.\d\d steps/s  ETA 0 s$", out, re.M), out
    assert re.search(r"^\[pet\] trained to step 3: \d+\.\d{3} steps/s steady \(after the first step\), "
                     r"\d+ torch thread\(s\)$", out, re.M), out


def test_progress_reports_as_rarely_as_its_lines():
    """`report` (the client job's note to the coordinator) gets (step, total, ETA) exactly when a line
    is due: the first step (no ETA yet), then at most every interval, and the last step."""
    from types import SimpleNamespace

    from blocklora.training.trainer import Progress

    lines, reports = [], []
    shown = Progress("pet", 50, interval_s=3600, out=lines.append, report=lambda *r: reports.append(r))
    for step in range(1, 51):
        shown(SimpleNamespace(step_count=step), 0.5)
    assert len(lines) == len(reports) == 2
    assert reports[0] == (1, 50, None) and reports[1][:2] == (50, 50) and reports[1][2] == 0.0


@pytest.mark.parametrize("spec, target", [("tiny", "noise"), ("tiny-sd2", "velocity")])
def test_loss_target_follows_the_schedulers_prediction_type(spec, target):
    """SD 2.x's v-prediction UNet learns v = √ᾱ ε − √(1−ᾱ) x0 (diffusers' get_velocity); SD 1.x the noise.
    The loss is recomputed here from the trainer's own random draws (no erasure: a fixed forward)."""
    from blocklora.pipeline.base import load_base
    from blocklora.pipeline.conditioning import encode_prompts
    from blocklora.training.trainer import ConceptTrainer

    base = load_base(spec)
    trainer = ConceptTrainer(base, AdapterConfig(erasure=0.0), TrainConfig(resolution=32), 1, "pet", "dog")
    images, prompts = torch.rand(2, 3, 32, 32) * 2 - 1, [f"a photo of {trainer.trigger_text} dog"] * 2
    state = trainer.gen.get_state()
    loss = trainer.loss(images, prompts)
    trainer.gen.set_state(state)  # the same draws again, by hand
    pipe, sched = base.pipe, trainer.noise_scheduler
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.sample(trainer.gen) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=trainer.gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=trainer.gen)
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, encode_prompts(base, prompts)[0]).sample
    want = {"noise": noise, "velocity": sched.get_velocity(latents, noise, t)}
    per_target = {k: ((pred - v) ** 2).mean(dim=(1, 2, 3)) for k, v in want.items()}
    torch.testing.assert_close(loss.detach(), per_target[target])
    assert not torch.allclose(per_target["noise"], per_target["velocity"])  # the two targets do differ here
    trainer.close()


def test_merge_scale_share_trains_some_steps_at_an_eq5_strength(tmp_path):
    """With merge_scale_share 1 every step's forward sees the residual at 1/n, n in 2..K (the strength an
    Eq. 5 merge of n leaves it); afterwards every layer is back at full strength; 0 changes nothing."""
    from blocklora.pipeline.base import load_base
    from blocklora.training.data import load_concept_images
    from blocklora.training.trainer import ConceptTrainer

    x, caps = load_concept_images(write_images(tmp_path / "img"), 32)
    seen: list[float] = []
    trainer = ConceptTrainer(load_base("tiny"), CFG, TrainConfig(resolution=32, merge_scale_share=1.0), 2, "pet", "dog")
    layer = next(iter(trainer.layers.values()))
    layer.register_forward_hook(lambda mod, args, out: seen.append(mod.scale))
    for _ in range(12):
        trainer.step(*trainer.sample_batch(x, caps))
    trainer.close()
    assert seen and set(seen) <= {1 / n for n in range(2, CFG.num_slots + 1)} and len(set(seen)) > 1, set(seen)
    assert all(layer.scale == 1.0 for layer in trainer.layers.values())
    full = _train(load_base("tiny"), write_images(tmp_path / "img2"), steps=2)
    same = _train(load_base("tiny"), write_images(tmp_path / "img2"), steps=2, merge_scale_share=0.0)
    assert all(torch.equal(full.tensors[k], same.tensors[k]) for k in full.tensors)
    with pytest.raises(ValueError, match="merge_scale_share"):
        TrainConfig(merge_scale_share=1.5)
