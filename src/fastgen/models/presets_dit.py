"""Diffusion-transformer presets: SD3/3.5 (MMDiT), FLUX.1 and PixArt-Sigma architectures as data.

``presets`` merges :data:`DIT_PRESETS` into its table. The public architectures are copied from the
checkpoints' ``config.json`` files (stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev,
PixArt-alpha/PixArt-Sigma-XL-2-1024-MS); the tiny ones follow diffusers' own fast-test configs
(tests/pipelines/{stable_diffusion_3,flux,pixart_sigma}) with the features of the big ones kept
(SD3.5's RMS q/k norm and dual-attention layers, FLUX.1-dev's guidance embedding, PixArt's learned sigma),
and widths chosen so that every text encoder's output fits the transformer it feeds.

The scheduler configs (:data:`DIT_SCHEDULERS`) are the checkpoints' ``scheduler_config.json``, keyed
by the transformer class, so a preset and a tiny stand-in of it schedule alike.
"""

from __future__ import annotations

from typing import Any

# --- shared encoders ------------------------------------------------------------------------------

# google/t5-v1_1-xxl's encoder, as SD3's text_encoder_3, FLUX's text_encoder_2 and PixArt-Sigma's
# text_encoder ship it (T5EncoderModel, gated-gelu, 24 layers of width 4096).
T5_XXL: dict[str, Any] = {
    "architectures": ["T5EncoderModel"],
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

# The same layout at tiny size. d_model 128 leaves room for tiny-sd3's CLIP states side by side
# (32 + 64 = 96 channels, zero-padded to the T5 width, as SD3 pads 768 + 1280 to 4096).
TINY_T5: dict[str, Any] = {
    **T5_XXL,
    "d_ff": 64,
    "d_kv": 16,
    "d_model": 128,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "num_layers": 2,
    "vocab_size": 1000,
}

# The 16-channel KL VAE of SD3 (stabilityai/stable-diffusion-3.5-medium/vae): no quant convs.
SD3_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
# FLUX.1's VAE: SD3's layout with its own latent statistics.
FLUX_VAE: dict[str, Any] = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# --- transformers --------------------------------------------------------------------------------

# stabilityai/stable-diffusion-3.5-medium/transformer/config.json (MMDiT-X: dual attention in the
# first 13 blocks, RMS-normalised q/k).
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

# black-forest-labs/FLUX.1-dev/transformer/config.json
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/transformer/config.json (out_channels 8: epsilon and sigma), less
# double_self_attention, only_cross_attention and use_linear_projection, which PixArtTransformer2DModel
# does not take (diffusers ignores them with a warning).
PIXART_SIGMA_TRANSFORMER: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "interpolation_scale": 2,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": False,
}

# Tiny SD3.5: two blocks, the first with dual attention; joint dim = the tiny T5's width, pooled dim =
# the two tiny CLIP projections side by side (32 + 32). pos_embed_max_size 16 patches: every size in the
# default profile (up to 128 px = 8 patches) crops the position table, as SD3 does at any resolution.
TINY_SD3_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 8,
    "caption_projection_dim": 32,
    "dual_attention_layers": [0],
    "in_channels": 16,
    "joint_attention_dim": 128,
    "num_attention_heads": 4,
    "num_layers": 2,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 16,
    "qk_norm": "rms_norm",
    "sample_size": 8,
}

# Tiny FLUX.1-dev: one double and one single block, guidance embedding on; the rotary axes split the
# head (4 + 6 + 6 = 16) as FLUX's 16 + 56 + 56 = 128 do; pooled dim = the tiny CLIP's width.
TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 128,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 1,
    "patch_size": 1,
    "pooled_projection_dim": 32,
}

# Tiny PixArt-Sigma: diffusers' fast-test transformer with the tiny T5's width as caption channels.
TINY_PIXART_TRANSFORMER: dict[str, Any] = {
    **PIXART_SIGMA_TRANSFORMER,
    "attention_head_dim": 8,
    "caption_channels": 128,
    "cross_attention_dim": 24,
    "num_attention_heads": 3,
    "num_layers": 2,
    "sample_size": 8,
}

# --- schedulers ----------------------------------------------------------------------------------

SD3_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
}
FLUX_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}
# PixArt-Sigma-XL-2-1024-MS/scheduler/scheduler_config.json
PIXART_SCHEDULER: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "dynamic_thresholding_ratio": 0.995, "euler_at_final": False,
    "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_karras_sigmas": False, "use_lu_lambdas": False,
    "variance_type": None,
}

#: Transformer class -> (pipeline family, scheduler config).
DIT_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "SD3Transformer2DModel": ("sd3", SD3_SCHEDULER),
    "FluxTransformer2DModel": ("flux", FLUX_SCHEDULER),
    "PixArtTransformer2DModel": ("pixart", PIXART_SCHEDULER),
}


def dit_presets(tiny_vae: dict[str, Any], tiny_clip: dict[str, Any], tiny_clip_2: dict[str, Any],
                clip_l: dict[str, Any], clip_bigg: dict[str, Any], sdxl_vae: dict[str, Any]
                ) -> dict[str, dict[str, tuple[str, str, dict[str, Any]]]]:
    """preset -> component -> (library, class, config), reusing ``presets``' own CLIP and VAE configs."""
    tiny_vae16 = {**tiny_vae, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
    tiny_sd3_vae = {**tiny_vae16, "scaling_factor": SD3_VAE["scaling_factor"], "shift_factor": SD3_VAE["shift_factor"]}
    tiny_flux_vae = {**tiny_vae16, "scaling_factor": FLUX_VAE["scaling_factor"],
                     "shift_factor": FLUX_VAE["shift_factor"]}
    # PixArt-Sigma decodes with SDXL's VAE: the tiny one with SDXL's scaling.
    tiny_sdxl_vae = {**tiny_vae, "scaling_factor": sdxl_vae["scaling_factor"], "force_upcast": True}
    d, t = "diffusers", "transformers"
    return {
        "tiny-sd3": {
            "transformer": (d, "SD3Transformer2DModel", TINY_SD3_TRANSFORMER),
            "vae-decoder": (d, "AutoencoderKL", tiny_sd3_vae),
            "vae-encoder": (d, "AutoencoderKL", tiny_sd3_vae),
            "text-encoder": (t, "CLIPTextModelWithProjection", tiny_clip),
            "text-encoder-2": (t, "CLIPTextModelWithProjection", tiny_clip_2),
            "text-encoder-3": (t, "T5EncoderModel", TINY_T5),
        },
        "tiny-flux": {
            "transformer": (d, "FluxTransformer2DModel", TINY_FLUX_TRANSFORMER),
            "vae-decoder": (d, "AutoencoderKL", tiny_flux_vae),
            "vae-encoder": (d, "AutoencoderKL", tiny_flux_vae),
            "text-encoder": (t, "CLIPTextModel", tiny_clip),
            "text-encoder-2": (t, "T5EncoderModel", TINY_T5),
        },
        "tiny-pixart": {
            "transformer": (d, "PixArtTransformer2DModel", TINY_PIXART_TRANSFORMER),
            "vae-decoder": (d, "AutoencoderKL", tiny_sdxl_vae),
            "vae-encoder": (d, "AutoencoderKL", tiny_sdxl_vae),
            "text-encoder": (t, "T5EncoderModel", TINY_T5),
        },
        "sd35-medium": {
            "transformer": (d, "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER),
            "vae-decoder": (d, "AutoencoderKL", SD3_VAE),
            "vae-encoder": (d, "AutoencoderKL", SD3_VAE),
            "text-encoder": (t, "CLIPTextModelWithProjection", clip_l),
            "text-encoder-2": (t, "CLIPTextModelWithProjection", clip_bigg),
            "text-encoder-3": (t, "T5EncoderModel", T5_XXL),
        },
        "flux-dev": {
            "transformer": (d, "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER),
            "vae-decoder": (d, "AutoencoderKL", FLUX_VAE),
            "vae-encoder": (d, "AutoencoderKL", FLUX_VAE),
            "text-encoder": (t, "CLIPTextModel", clip_l),
            "text-encoder-2": (t, "T5EncoderModel", T5_XXL),
        },
        "pixart-sigma": {
            "transformer": (d, "PixArtTransformer2DModel", PIXART_SIGMA_TRANSFORMER),
            "vae-decoder": (d, "AutoencoderKL", sdxl_vae),
            "vae-encoder": (d, "AutoencoderKL", sdxl_vae),
            "text-encoder": (t, "T5EncoderModel", T5_XXL),
        },
    }


#: Nominal image sizes (pixels, min/opt/max) of the DiT presets.
DIT_IMAGE_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny-sd3": (32, 64, 128),
    "tiny-flux": (32, 64, 128),
    "tiny-pixart": (32, 64, 128),
    "sd35-medium": (512, 1024, 1536),
    "flux-dev": (512, 1024, 1536),
    "pixart-sigma": (512, 1024, 1536),
}
