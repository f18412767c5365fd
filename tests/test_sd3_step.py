"""The SD3 pieces compose with the one training step (training/step.py): the flow-matching objective, the SD3
conditioning and the transformer's keyword call give, through `step_loss`, exactly the loss diffusers' SD3 LoRA
script computes (examples/dreambooth/train_dreambooth_lora_sd3.py: preconditioned x0 target, weighting none); the
denoiser call is the SD3.5 Medium family's `predict`."""

import json

import torch

from sdlora.config import LossConfig
from sdlora.model.families import SD35M
from sdlora.model.flow_objective import FlowMatchingObjective
from sdlora.model.sd3 import SD3Conditioning
from sdlora.model.sd3_text import encode_sd3, tokenize_sd3
from sdlora.training.draws import GeneratorDraws
from sdlora.training.step import step_loss


def test_step_loss_equals_the_diffusers_sd3_script_loss(tiny_sd35m):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35m)
    scheduler = json.loads((tiny_sd35m / "scheduler" / "scheduler_config.json").read_text())
    objective = FlowMatchingObjective.from_configs(scheduler, dict(pipe.vae.config), target="x0")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        x0 = objective.latents(pipe.vae.encode(images).latent_dist.mean)
        cond = encode_sd3(tokenize_sd3(["a red circle", "a blue square"], pipe.tokenizer, pipe.tokenizer_2,
                                       pipe.tokenizer_3, 16), pipe.text_encoder, pipe.text_encoder_2,
                          pipe.text_encoder_3, joint_attention_dim=pipe.transformer.config.joint_attention_dim)
        noise, sigma = objective.draw(GeneratorDraws(torch.Generator().manual_seed(1), 2, "cpu"), x0)
        noised = objective.noised(x0, noise, sigma)
        ours = step_loss(objective, SD35M, pipe.transformer, noised, SD3Conditioning(*cond, (), ()), {}, LossConfig())

        # the script's lines, on the same x0, noise and sigmas
        sigmas = sigma.reshape(-1, 1, 1, 1)
        noisy_model_input = sigmas * noise + (1.0 - sigmas) * x0
        model_pred = pipe.transformer(hidden_states=noisy_model_input, timestep=sigma * 1000,
                                      encoder_hidden_states=cond[0], pooled_projections=cond[1],
                                      return_dict=False)[0]
        model_pred = model_pred * (-sigmas) + noisy_model_input
        weighting = torch.ones_like(sigmas)
        theirs = torch.mean((weighting.float() * (model_pred.float() - x0.float()) ** 2).reshape(2, -1), 1).mean()
    # the same operations in the same order (a + b == b + a exactly in IEEE arithmetic): bit-identical
    assert torch.equal(ours, theirs) and ours.item() > 0
