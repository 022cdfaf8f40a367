"""STIC: self-training on image comprehension for vision-language models."""

import logging
import warnings


class _NoCpuKernelsWarning(logging.Filter):
    """bitsandbytes (imported by peft and trl) warns on every import, on CPUs with AVX512-BF16, that the optional
    `kernels` package is missing. That kernel only speeds up 4-bit layers on the CPU, which stic refuses
    (model.load_in_4bit needs a GPU), so exactly this message is dropped; the logger's other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# added before bitsandbytes is imported: getLogger returns this same logger object to it later
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoCpuKernelsWarning())


class _MtimeWarning(logging.Filter):
    """Checkpoints saved within a second of each other (small runs) make transformers warn, once per command,
    that mtimes "may not be reliable" before it sorts them by step number, which is the order stic wants anyway;
    exactly this message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("mtime may not be reliable")


logging.getLogger("transformers.trainer_utils").addFilter(_MtimeWarning())
# PEFT and TRL read the model's deprecated `is_gradient_checkpointing` alias in every training and adapter
# command; the warning is theirs to act on, not the user's
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
