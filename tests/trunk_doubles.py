"""Small trunks the architecture tests share: what a contract refuses, built without data."""

from torch import nn

from mtl.trunks import Trunk


class NoStagesTrunk(Trunk):
    """A trunk that overrides forward and lists no stages (as some wrapped models do)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def layer_groups(self):
        return [("fc", self.fc)]

    def forward(self, x):
        return self.fc(x)


class EmptyStagesTrunk(NoStagesTrunk):
    """A trunk whose stages() is an empty list."""

    def stages(self):
        return []


class HostReadTrunk(NoStagesTrunk):
    """A trunk whose one stage reads a value to the host, which vmap cannot batch."""

    def stages(self):
        return [lambda x: self.fc(x) * (2.0 if self.fc(x).sum().item() > -1e9 else 1.0)]
