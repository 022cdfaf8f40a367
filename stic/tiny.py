"""Tiny, randomly initialised vision-language models built fully offline.

Each family uses its real transformers architecture, a byte-level BPE tokenizer trained in code with
`tokenizers`, the family's real image processor and a chat template with the family's turn format. The
result is saved with `save_pretrained`, so tests and the default recipe load it through exactly the same
`AutoModelForImageTextToText` / `AutoProcessor` path as a hub checkpoint.

    stic tiny-model --family llava -o DIR
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "idefics3")
BUILD_VERSION = 2  # bump when a builder changes, so cached tiny models are rebuilt

# A small English corpus for the BPE merges: enough that prompts tokenize into word-sized pieces.
_CORPUS = """
a an the this that these those is are was were be been being has have had do does did of in on at by for with
from to into over under above below near behind front left right top bottom middle center background foreground
image picture photo photograph scene view describe description detail details caption question answer please
step first then next finally main subject subjects object objects person people man woman child dog cat bird car
tree trees sky cloud water road building street table chair cup food plate window wall floor light shadow
color colors red green blue yellow orange purple pink brown black white gray grey bright dark warm cold soft
large small big tiny tall short round square long wide one two three four five six many several some few
setting mood lighting composition notable interpret interpretation imagine imaginative hypothetical plausible
what where who how why which when there here it its they their them he she his her and or but not no yes
USER ASSISTANT User Assistant INST system user assistant
sitting standing walking running holding looking wearing playing eating moving flying lying smiling
""".split()

# Each family's chat template renders exactly what the published checkpoint's template renders, so the special
# tokens a tiny model sees (BOS, EOS, turn markers) are the real family's:
# - llava (llava-hf/llava-1.5-7b-hf): no BOS in the template (its Llama tokenizer adds `<s>` by itself), assistant
#   turns end with a space and no EOS, a system message is its text and a space;
# - llava_next, qwen2_5_vl, idefics3: the published templates of llava-hf/llava-v1.6-mistral-7b-hf,
#   Qwen/Qwen2.5-VL-7B-Instruct and SmolVLM, read from the copies TRL ships (trl/chat_templates/).
_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _published_template(name: str) -> str:
    from importlib.resources import files

    return files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()


def _train_tokenizer(special_tokens: list[str], vocab_size: int):
    """Byte-level BPE trained on the built-in corpus: any text round-trips, common words are one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(_CORPUS)] + [" " + w for w in _CORPUS] + [w.capitalize() for w in _CORPUS]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def _fast_tokenizer(tok, add_bos: str | None = None, **special):
    """`add_bos`: the BOS token the tokenizer puts first by itself, as Llama/Mistral tokenizers do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if add_bos:
        bos_id = tok.token_to_id(add_bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{add_bos} $A", pair=f"{add_bos} $A {add_bos} $B", special_tokens=[(add_bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)


def _llama_text(vocab_size: int, **ids):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **ids,
    )


def _clip_vision(image_size: int = 32, patch_size: int = 8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )


def _build_llava(next_: bool):
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = _train_tokenizer(specials, vocab_size=1024)
    tokenizer = _fast_tokenizer(tok, add_bos="<s>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>")
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    text = _llama_text(len(tokenizer), **ids)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if not next_:
        config = LlavaConfig(
            vision_config=_clip_vision(), text_config=text, image_token_id=image_token,
            vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=_LLAVA_TEMPLATE,
        )
    else:
        pinpoints = [[32, 64], [64, 32], [64, 64]]
        config = LlavaNextConfig(
            vision_config=_clip_vision(), text_config=text, image_token_id=image_token,
            image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=_published_template("llava_next"),
        )
    return model, processor


def _build_qwen2_5_vl():
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = _train_tokenizer(specials, vocab_size=1024)
    tokenizer = _fast_tokenizer(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tid = tokenizer.convert_tokens_to_ids
    hidden, heads = 64, 4
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"),
            # mrope splits the rotary half-dimension (head_dim/2 = 8) over time, height and width
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    # 28 px merged patches; at most 4x4 of them per image keeps the sequence short
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_published_template("qwen2_5_vl"),
        video_processor=Qwen2VLVideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
    )
    return model, processor


def _build_idefics3():
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    row_col = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<unk>", "<|im_start|>", "<end_of_utterance>", "<pad>", "<image>", "<fake_token_around_image>",
                "<global-img>", *row_col]
    tok = _train_tokenizer(specials, vocab_size=1024)
    tokenizer = _fast_tokenizer(tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                pad_token="<pad>")
    tid = tokenizer.convert_tokens_to_ids
    text = _llama_text(len(tokenizer), bos_token_id=tid("<|im_start|>"), eos_token_id=tid("<end_of_utterance>"),
                       pad_token_id=tid("<pad>"))
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=text, image_token_id=tid("<image>"), scale_factor=2, pad_token_id=tid("<pad>"),
    )
    model = Idefics3ForConditionalGeneration(config)
    # one 32 px global image plus at most 2x2 tiles; (32/8)^2 / 2^2 = 4 tokens per tile
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=_published_template("smolvlm"))
    return model, processor


_BUILDERS = {
    "llava": lambda: _build_llava(next_=False),
    "llava_next": lambda: _build_llava(next_=True),
    "qwen2_5_vl": _build_qwen2_5_vl,
    "idefics3": _build_idefics3,
}


def build_tiny_model(family: str, seed: int = 0):
    """Return (model, processor) for a family, with weights drawn from `seed`."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny-model family {family!r}; choose one of {', '.join(FAMILIES)}")
    import torch  # here, not at the top: `stic --help` lists FAMILIES without loading torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[family]()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    if family == "qwen2_5_vl":  # Qwen2.5-VL stops at <|im_end|> or <|endoftext|>
        model.generation_config.eos_token_id = [processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id]
    return model.eval(), processor


def save_tiny_model(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny model; the directory appears atomically, so concurrent callers are safe."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    model, processor = build_tiny_model(family, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "stic_tiny.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race; its copy is identical
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_model_path(spec: str) -> Path:
    """Resolve `tiny:<family>[@seed]` to a cached directory, building it on first use."""
    body = spec.removeprefix("tiny:")
    family, _, seed = body.partition("@")
    cache = Path(os.environ.get("STIC_CACHE", Path.home() / ".cache" / "stic")) / "tiny"
    return save_tiny_model(family, cache / f"{family}-seed{seed or 0}-v{BUILD_VERSION}", seed=int(seed or 0))


def hub_shaped_model(family: str, dtype: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny model folder stored as hub checkpoints are: every Linear weight drawn at std 0.02 (the scale of 7B
    weights, where a 2e-5 step is below half a bf16 ulp), saved in `dtype` ("bfloat16", "float16"), with the
    family's real module names. Tiny fp32 models hide the precision faults that these show."""
    import torch

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    model, processor = build_tiny_model(family)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    return out
