"""The VIEScore judge prompts that GEdit-Bench scores edits with, word for word.

From VIEScore (TIGER-AI-Lab/VIEScore, MIT license) as GEdit-Bench uses them (stepfun-ai/Step1X-Edit,
``GEdit-Bench/viescore/vie_prompts.py``): the zero-shot context without delimiters, the two-image edit
rule, the semantic-consistency (SC) rule for text-guided image editing and the perceptual-quality (PQ)
rule. Written one line per string so that no trailing space can get lost; a test pins their digests.
"""

from __future__ import annotations

__all__ = ["CONTEXT", "INSTRUCTION_SLOT", "RULE_PQ", "TIE_RULE_SC", "TWO_IMAGE_EDIT_RULE"]

INSTRUCTION_SLOT = "<instruction>"  # replaced by the edit instruction in the SC prompt

CONTEXT = (
    'You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.\n'
    'All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.\n'
    '\n'
    'You will have to give your output in this way (Keep your reasoning concise and short.):\n'
    '{\n'
    '"score" : [...],\n'
    '"reasoning" : "..."\n'
    '}'
)
TWO_IMAGE_EDIT_RULE = (
    'RULES:\n'
    '\n'
    'Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.\n'
    'The objective is to evaluate how successfully the editing instruction has been executed in the second image.\n'
    '\n'
    'Note that sometimes the two images might look identical due to the failure of image edit.\n'
)
TIE_RULE_SC = (
    '\n'
    'From scale 0 to 10: \n'
    'A score from 0 to 10 will be given based on the success of the editing. (0 indicates that the scene in the edited image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the editing instruction text perfectly.)\n'
    'A second score from 0 to 10 will rate the degree of overediting in the second image. (0 indicates that the scene in the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)\n'
    "Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.\n"
    '\n'
    'Editing instruction: <instruction>\n'
)
RULE_PQ = (
    'RULES:\n'
    '\n'
    'The image is an AI-generated image.\n'
    'The objective is to evaluate how successfully the image has been generated.\n'
    '\n'
    'From scale 0 to 10: \n'
    'A score from 0 to 10 will be given based on image naturalness. \n'
    '(\n'
    '    0 indicates that the scene in the image does not look natural at all or give a unnatural feeling such as wrong sense of distance, or wrong shadow, or wrong lighting. \n'
    '    10 indicates that the image looks natural.\n'
    ')\n'
    'A second score from 0 to 10 will rate the image artifacts. \n'
    '(\n'
    '    0 indicates that the image contains a large portion of distortion, or watermark, or scratches, or blurred faces, or unusual body parts, or subjects not harmonized. \n'
    '    10 indicates the image has no artifacts.\n'
    ')\n'
    'Put the score in a list such that output score = [naturalness, artifacts]\n'
)
