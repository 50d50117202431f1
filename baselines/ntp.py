"""Next-token prediction: the plain backbone with the cross-entropy loss (spec section 3, "NTP")."""

from cocomix.methods import Method


class NTP(Method):
    name = "ntp"
