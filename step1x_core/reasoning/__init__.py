"""Step1X-Edit v1.2's thinking and reflection, independent of the DiT.

prompts (packaged prompt files, placeholders, the request of each stage) -> chat (who answers: any
``ChatModel``; ``qwen_chat`` is the fine-tuned Qwen2.5-VL, ``chat_inputs`` its inputs) -> parsing (the
answers, read as the reference reads them) -> thinker (think; judge one edit) -> loop (edit, judge,
re-edit, choose) -> report (the loop's account as text).
"""
