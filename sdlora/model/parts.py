"""The parts of a model family: one row per part, and the rows SD 1.x, SD 2.x and SDXL are made of.

A part is what a diffusers folder keeps in one subfolder: the denoiser (a UNet, an MMDiT transformer), each text
encoder (with its tokenizer) and the VAE. Its row says everything that names it or builds it, so that loading,
canonical module names, the file layouts (native, kohya, single file), inspect's groups, extract and merge read
the family's table instead of listing `unet` / `text_encoder_2`:

- `name`: the part's name, which is its diffusers subfolder, its keyword in the family's pipeline and the first
  word of its canonical module names (`unet.down_blocks.0...`, `text_encoder_2.encoder.layers.0...`);
- `role`: `denoiser`, `text_encoder` or `vae` (what the loop, LoRA targets and rates do with it);
- `model_class`: `<library>.<class>` built by `from_pretrained` (`diffusers.UNet2DConditionModel`,
  `transformers.CLIPTextModelWithProjection`);
- `tokenizer` / `tokenizer_class`: a text encoder's tokenizer subfolder and class;
- `model_level`: a level of the model's module paths that canonical names leave out and the native layout writes
  (`text_model.`: transformers 4 had it in CLIPTextModel, transformers 5 kept it in CLIPTextModelWithProjection);
- `kohya_prefix`: the kohya LoRA key prefix (`lora_unet_`, `lora_te_`, `lora_te1_`); kohya writes the model level
  after it (`lora_te_text_model_...`);
- `single_file`: for a text encoder, (layout of `ldm_keys.TEXT_ENCODER_LAYOUTS`, key prefix) in the original
  single-file layout;
- `lora`: whether the part carries adapters when its role trains (SD3's T5 says False: frozen unless
  `text_encoder.train_parts` names it);
- `optional`: a folder may lack the part (SD3 without T5: `text_encoder_3` absent; the family then feeds what its
  pipeline feeds in its place);
- `targets`: the part's default LoRA targets, used when the config does not set `lora.unet_targets` (the denoiser)
  or `lora.text_encoder_targets` (a text encoder); None: the config's defaults (the SD families' CLIP and UNet);
- `words`: the identifiers of the model's module paths (digits between them are list indices): kohya names lose
  the dots (`attn1_to_out_0`), and these are what a name is split back into without the model at hand;
- `extract_linears`: a regular expression searched in a module path (with a leading dot): the Linear layers
  `sdlora extract` considers in the part (those LoRA files of the family carry: the UNet's attention, a CLIP's or
  T5's layers, every Linear of an MMDiT joint block);
- `conv_lora`: the part has the convolutions conv LoRA adapts (the UNet's resnets and 1x1 projections; an MMDiT
  has none: `sdlora extract --conv` refuses it).

Adding a family's parts is writing its rows here (docs/architecture.md, "Adding a model family").
"""

from __future__ import annotations

from dataclasses import dataclass

from sdlora.model import ldm_keys as L

DENOISER, TEXT_ENCODER, VAE = "denoiser", "text_encoder", "vae"
ROLES = (DENOISER, TEXT_ENCODER, VAE)


@dataclass(frozen=True)
class Part:
    name: str
    role: str
    model_class: str
    tokenizer: str | None = None
    tokenizer_class: str = "transformers.CLIPTokenizer"
    model_level: str = ""
    kohya_prefix: str | None = None
    single_file: tuple[str, str] | None = None
    lora: bool = True
    words: frozenset = frozenset()
    optional: bool = False
    targets: tuple | None = None
    extract_linears: str | None = None
    conv_lora: bool = False

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"part {self.name}: role {self.role!r} is none of {', '.join(ROLES)}")

    @property
    def adaptable(self) -> bool:
        """Whether adapters can live in it (the denoiser and the text encoders; never the VAE)."""
        return self.role != VAE

    @property
    def kohya_level(self) -> str:
        """The model level as kohya writes it after the prefix (`text_model_`)."""
        return self.model_level.replace(".", "_")

    def build_class(self):
        """The class `model_class` names, imported on demand."""
        return _import(self.model_class)

    def tokenizer_type(self):
        return _import(self.tokenizer_class)


def _import(qualified: str):
    import importlib

    library, _, cls = qualified.rpartition(".")
    return getattr(importlib.import_module(library), cls)


# ---------------------------------------------------------------------------------- SD 1.x, 2.x and SDXL
UNET_WORDS = frozenset("""
down_blocks up_blocks mid_block attentions resnets downsamplers upsamplers transformer_blocks
attn1 attn2 to_q to_k to_v to_out ff net proj proj_in proj_out norm norm1 norm2 norm3
conv conv1 conv2 conv_shortcut time_emb_proj conv_in conv_out conv_norm_out time_embedding linear_1 linear_2
""".split())  # UNet2DConditionModel's
CLIP_WORDS = frozenset("""
encoder layers self_attn q_proj k_proj v_proj out_proj mlp fc1 fc2 embeddings final_layer_norm
layer_norm1 layer_norm2 token_embedding position_embedding
""".split())  # CLIPTextModel's (and CLIPTextModelWithProjection's)

CLIP_LAYERS = r"\.encoder\.layers\."  # a CLIP's transformer layers (not its embeddings or projection)
UNET = Part("unet", DENOISER, "diffusers.UNet2DConditionModel", kohya_prefix="lora_unet_", words=UNET_WORDS,
            extract_linears=r"\.attentions\.", conv_lora=True)
SD_VAE = Part("vae", VAE, "diffusers.AutoencoderKL")
# The one CLIP text encoder of SD 1.x (CLIP-L) and SD 2.x (OpenCLIP-H, read as CLIPTextModel).
SD1_TEXT_ENCODER = Part("text_encoder", TEXT_ENCODER, "transformers.CLIPTextModel", tokenizer="tokenizer",
                        model_level="text_model.", kohya_prefix="lora_te_", single_file=("clip_l", L.CLIP_L),
                        words=CLIP_WORDS, extract_linears=CLIP_LAYERS)
SD2_TEXT_ENCODER = Part("text_encoder", TEXT_ENCODER, "transformers.CLIPTextModel", tokenizer="tokenizer",
                        model_level="text_model.", kohya_prefix="lora_te_", single_file=("open_clip", L.OPEN_CLIP),
                        words=CLIP_WORDS, extract_linears=CLIP_LAYERS)
# SDXL: CLIP-L and OpenCLIP bigG (with its projection: the pooled embedding); its second tokenizer pads with "!".
SDXL_TEXT_ENCODER = Part("text_encoder", TEXT_ENCODER, "transformers.CLIPTextModel", tokenizer="tokenizer",
                         model_level="text_model.", kohya_prefix="lora_te1_", single_file=("clip_l", L.SDXL_CLIP_L),
                         words=CLIP_WORDS, extract_linears=CLIP_LAYERS)
SDXL_TEXT_ENCODER_2 = Part("text_encoder_2", TEXT_ENCODER, "transformers.CLIPTextModelWithProjection",
                           tokenizer="tokenizer_2", model_level="text_model.", kohya_prefix="lora_te2_",
                           single_file=("open_clip", L.SDXL_OPEN_CLIP), words=CLIP_WORDS, extract_linears=CLIP_LAYERS)

SD1_PARTS = (UNET, SD1_TEXT_ENCODER, SD_VAE)
SD2_PARTS = (UNET, SD2_TEXT_ENCODER, SD_VAE)
SDXL_PARTS = (UNET, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SD_VAE)

# ---------------------------------------------------------------------------------- SD3 and SD3.5
# SD3Transformer2DModel's module words (transformer_sd3.py, attention_processor.py: JointTransformerBlock, the
# dual-attention attn2 of SD3.5 Medium, QK-norm) and T5EncoderModel's (modeling_t5.py).
MMDIT_WORDS = frozenset("""
transformer_blocks attn attn2 to_q to_k to_v to_out add_q_proj add_k_proj add_v_proj to_add_out ff ff_context net
proj norm1 norm1_context norm2 norm2_context linear norm_q norm_k norm_added_q norm_added_k pos_embed context_embedder
time_text_embed timestep_embedder text_embedder linear_1 linear_2 norm_out proj_out
""".split())
T5_WORDS = frozenset("""
encoder block layer SelfAttention q k v o relative_attention_bias DenseReluDense wi wi_0 wi_1 wo layer_norm
final_layer_norm shared embed_tokens
""".split())
# diffusers' default SD3 LoRA (train_dreambooth_lora_sd3.py, SD3LoraLoaderMixin): both streams' attention. Without
# the script's `attn.` prefix these also adapt SD3.5 Medium's second attention (`attn2`), which the script leaves out.
SD3_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

SD3_TRANSFORMER = Part("transformer", DENOISER, "diffusers.SD3Transformer2DModel", kohya_prefix="lora_unet_",
                       words=MMDIT_WORDS, targets=SD3_ATTENTION_TARGETS,
                       extract_linears=r"^\.transformer_blocks\.")  # kohya's set: every Linear of each joint block
# CLIP-L and OpenCLIP bigG, both with their projection (each gives half of the pooled vector); T5-XXL, frozen by
# default (kohya: opt-in train_t5xxl), absent in a folder saved with text_encoder_3=None.
SD3_TEXT_ENCODER = Part("text_encoder", TEXT_ENCODER, "transformers.CLIPTextModelWithProjection", tokenizer="tokenizer",
                        model_level="text_model.", kohya_prefix="lora_te1_", words=CLIP_WORDS,
                        extract_linears=CLIP_LAYERS)
SD3_TEXT_ENCODER_2 = Part("text_encoder_2", TEXT_ENCODER, "transformers.CLIPTextModelWithProjection",
                          tokenizer="tokenizer_2", model_level="text_model.", kohya_prefix="lora_te2_",
                          words=CLIP_WORDS, extract_linears=CLIP_LAYERS)
SD3_TEXT_ENCODER_3 = Part("text_encoder_3", TEXT_ENCODER, "transformers.T5EncoderModel", tokenizer="tokenizer_3",
                          tokenizer_class="transformers.T5TokenizerFast", kohya_prefix="lora_te3_", lora=False,
                          words=T5_WORDS, optional=True, targets=("q", "k", "v", "o"),
                          extract_linears=r"\.block\.\d+\.layer\.")
SD3_PARTS = (SD3_TRANSFORMER, SD3_TEXT_ENCODER, SD3_TEXT_ENCODER_2, SD3_TEXT_ENCODER_3, SD_VAE)
