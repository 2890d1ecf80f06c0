"""A backbone entry point that points at the wrong kind of object."""


class NotAModule:
    """A plain class declared as a backbone; backbones must be torch.nn.Module classes or factories."""

    def __init__(self, input_shape=(1, 8, 8)):
        self.input_shape = tuple(input_shape)
