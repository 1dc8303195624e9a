"""Train a reward model with the APLOT loss, TRL style.

Every option of ``trl.RewardConfig`` and ``trl.ModelConfig`` is accepted, plus
the APLOT options of :class:`aplot_kernels.trl.APLOTRewardConfig`
(``--aplot_alpha``, ``--aplot_temperature``, ``--aplot_eps``,
``--aplot_n_iters``, ``--aplot_scale``, ``--aplot_detach``,
``--aplot_backend``, ``--aplot_gather``, ``--aplot_bank``), on the command line
or in a YAML file given with ``--config``.

The model is a Hub name or a local folder; the dataset is a Hub name, or a
local ``.json``/``.jsonl``/``.csv``/``.parquet`` file or folder, in TRL's
preference format (``chosen``, ``rejected``, optional ``prompt`` and ``margin``).

    python examples/train_reward_model.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized \\
        --output_dir Qwen2.5-0.5B-Reward-APLOT \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 \\
        --aplot_alpha 0.9 --aplot_bank true

    accelerate launch --num_processes 2 examples/train_reward_model.py --config rm.yaml --aplot_gather true
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from aplot_kernels.trl import APLOTRewardConfig, APLOTRewardTrainer

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_preferences(name: str, config: Optional[str] = None, streaming: bool = False):
    """A Hub dataset, or a local file (its format from its extension) as a ``train`` split."""
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in FILE_BUILDERS:
            raise ValueError(f"`dataset_name`: a local file must end in one of {sorted(FILE_BUILDERS)}, got {name!r}")
        return load_dataset(FILE_BUILDERS[extension], data_files={"train": name}, streaming=streaming)
    return load_dataset(name, name=config, streaming=streaming)


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, APLOTRewardConfig, ModelConfig))


def main(script_args, training_args, model_args) -> APLOTRewardTrainer:
    if not script_args.dataset_name:
        raise ValueError("`dataset_name` is required (a Hub dataset or a local file)")
    if not model_args.model_name_or_path:
        raise ValueError("`model_name_or_path` is required (a Hub model or a local folder)")
    init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}

    dataset = load_preferences(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    evaluate = training_args.eval_strategy != "no" and script_args.dataset_test_split in dataset
    trainer = APLOTRewardTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if evaluate else None,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def run(argv: Optional[Sequence[str]] = None) -> APLOTRewardTrainer:
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    return main(script_args, training_args, model_args)


if __name__ == "__main__":
    run()
