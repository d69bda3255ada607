"""Research on top of the library: designed studies, each in a folder with its README, and the
study tool (`tool`). The library never imports this package."""
