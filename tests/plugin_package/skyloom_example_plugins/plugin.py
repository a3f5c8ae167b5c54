"""The entry point module: registers this package's components through skyloom's hooks."""

from skyloom.hookspecs import hookimpl
from skyloom.kinds import PromptEnhancer, SafetyDecision, SafetyFilter

from skyloom_example_plugins.sampler import ExampleSampler


class WordBlocklistFilter(SafetyFilter):
    """An in-house style filter: refuses prompts that contain any of `words`."""

    def __init__(self, words=("forbidden-word",)):
        self.words = tuple(w.lower() for w in words)

    def check_text(self, text):
        hits = [w for w in self.words if w in text.lower()]
        if hits:
            return SafetyDecision(False, category="in_house", reason=f"blocklisted word {hits[0]!r}")
        return SafetyDecision(True)


class SuffixEnhancer(PromptEnhancer):
    def __init__(self, suffix=", cinematic lighting"):
        self.suffix = suffix

    def enhance(self, prompt):
        return prompt + self.suffix


@hookimpl
def register_samplers(register):
    register("example-midpoint", ExampleSampler, aliases=("midpoint",))


@hookimpl
def register_safety_filters(register):
    register("example-blocklist", WordBlocklistFilter)


@hookimpl
def register_prompt_enhancers(register):
    register("example-suffix", SuffixEnhancer)
