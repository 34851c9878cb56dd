"""The host's model in training mode, and back to exactly as loaded, as often as a run needs.

Training mode is: every host parameter frozen (``requires_grad`` off), every host module in eval
(SD has no dropout or batch norm to train), the LoRA modules attached beside the layers (hooks,
parametrizations) and in train mode, and the run's contexts entered (the host's own, lean frozen
layers, gradient checkpointing, a pivotal word's vectors).  ``leave`` undoes all of it: flags, modes
and forwards are as found, and no hook of ours is left.  A run enters once and leaves once; between two optimiser
steps it may leave and re-enter (``suspended``) to hand the model to a generation.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

from .checkpointing import gradient_checkpointing
from .frozen_layers import frozen_layers
from .model import TrainableModel
from .network import TrainingNetwork


class TrainingMode:
    def __init__(self, model: TrainableModel, net: TrainingNetwork, lean: bool, checkpointing: bool,
                 contexts: Sequence[Callable[[], AbstractContextManager]] = ()):
        """``contexts``: more of the run's own, entered after the LoRA is attached (pivotal.PivotalWord.placed)."""
        self.model, self.net, self.lean, self.checkpointing = model, net, lean, checkpointing
        self.contexts = list(contexts)
        self.modules = [model.unet] + [te for _, te in model.text_encoders]
        # as found: what leave() puts back
        self.flags = [(p, p.requires_grad) for mod in self.modules for p in mod.parameters()]
        self.modes = [(m, m.training) for mod in self.modules for m in mod.modules()]
        self._stack: ExitStack | None = None
        self._placed = False

    @property
    def active(self) -> bool:
        return self._stack is not None

    def enter(self) -> None:
        """Freeze, attach and enter the run's contexts; a failure part-way is undone by ``leave``."""
        for p, _ in self.flags:
            p.requires_grad_(False)
        for mod in self.modules:
            mod.eval()
        self._stack = stack = ExitStack()
        if self._placed:  # the optimiser's flat buffer holds the LoRA tensors now: they must not move
            self.net.check_placed()
        else:
            self.net.place()
            self._placed = True
        self.net.train()
        self.net.attach()
        m = self.model
        stack.enter_context(m.context() if m.context else nullcontext())
        stack.enter_context(frozen_layers(*(self.modules if self.lean else [])))
        stack.enter_context(gradient_checkpointing(m.unet, self.checkpointing))
        for context in self.contexts:
            stack.enter_context(context())

    def leave(self) -> None:
        """The model as found: contexts left, LoRA detached, flags and modes restored (idempotent)."""
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                stack.close()
        finally:
            self.net.detach()
            for p, rg in self.flags:
                p.requires_grad_(rg)
            for mod, training in self.modes:
                mod.train(training)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The model as loaded for the block, then training mode again (not after an exception:
        the run is ending then, and its own ``leave`` finds nothing left to undo)."""
        self.leave()
        yield
        self.enter()
