// Swagger UI's start-up, as a file of its own: /docs is served under a Content-Security-Policy
// with no inline script (script-src 'self'), like the playground on the same origin.
// The page names the schema's URL in the data-openapi-url attribute of #swagger-ui.
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // no badge from validator.swagger.io: the page loads nothing from another origin
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
})();
