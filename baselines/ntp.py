"""Next-token prediction: the plain backbone with the cross-entropy loss (spec section 3, "NTP")."""

from cocomix.methods.base import Method, register


@register
class NTP(Method):
    name = "ntp"
    description = "next-token prediction (the baseline: the backbone and its cross-entropy loss, nothing else)"
