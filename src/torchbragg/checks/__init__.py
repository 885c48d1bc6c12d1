"""Checks that ship with the package, written as pytest tests so they run the
same way from a source checkout (tests/ imports them) and from an installed
package (`torchbragg gradcheck` runs pytest on the module files here).

gradients: first- and second-order gradient checks of every continuous
parameter of the models.
"""
